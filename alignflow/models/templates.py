"""Chat templates: the fallback for base tokenizers that ship none, and the fingerprint every reference
carries, so a model and the data sampled from it are checked to share one template.
"""

from __future__ import annotations

# For base tokenizers that ship no chat template (many hub base models): plain-text turns, the
# assistant's ending in the tokenizer's own EOS so the tuned model learns to stop, with generation
# markers for TRL's assistant masks. The prompt with the generation prompt is a prefix of the chat.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '### ' + message['role'] + ':\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### assistant:\n' }}{%- endif %}"
)


class ChatTemplateMismatch(ValueError):
    """Two stages would render the same conversation differently; the message names both fingerprints."""


def template_fingerprint(tokenizer) -> str:
    """A short content hash of how a tokenizer renders chats: its chat template and the EOS/BOS tokens
    the template may refer to. Recorded with every model and sampled dataset (`alignflow.chat_template`)."""
    import hashlib
    import json

    template = tokenizer.chat_template
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    payload = json.dumps([text, tokenizer.eos_token, tokenizer.bos_token])
    return "tmpl:" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def check_template(tokenizer, expected: str | None, where: str, source: str) -> str:
    """The tokenizer's template fingerprint; fails if it differs from the one `source` was made with.
    Called right after the tokenizer loads, before any weights do."""
    actual = template_fingerprint(tokenizer)
    if expected and actual != expected:
        raise ChatTemplateMismatch(
            f"{where}: chat template {actual} differs from {expected}, the one {source} used: the model would "
            "see conversations rendered differently from those it was trained or sampled on")
    return actual
