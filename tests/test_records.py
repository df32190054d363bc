"""What alignflow's MLflow records say about themselves, read back through MlflowClient.

    .venv/bin/python -m pytest -q tests/test_records.py
"""

from mlflow.tracking import MlflowClient

from alignflow.tracking import parent_run

KIND = "mlflow.experimentKind"


def test_experiments_open_as_fine_tuning_and_a_kind_chosen_in_the_ui_is_kept(mlflow_store):
    """MLflow 3's UI takes an untagged experiment whose runs log datasets and tables for a GenAI app and lists
    the flow runs under "Evaluation runs"; the experiment kind tag opens it in the model-training view."""
    client = MlflowClient()
    with parent_run("kind-new", "flow", "hash", {}) as run:
        pass
    assert client.get_experiment(run.experiment_id).tags[KIND] == "finetuning"

    chosen = client.create_experiment("kind-chosen", tags={KIND: "custom_model_development"})
    with parent_run("kind-chosen", "flow", "hash", {}):
        pass
    assert client.get_experiment(chosen).tags[KIND] == "custom_model_development"


def test_printed_links_open_the_model_training_view():
    """MLflow 3.17's UI opens every experiment in its GenAI view, where a flow run is an "Evaluation", whatever
    the experiment kind (seen in headless Chromium, docs/records.md); the page's workflowType picks the view."""
    from alignflow.tracking import ui_page

    assert ui_page("7", "abc") == "/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert ui_page("7") == "/#/experiments/7?workflowType=machine_learning"
