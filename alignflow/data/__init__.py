"""Data by job: reading rows (records), instruction data converted to prompt/completion (instructions),
preference data converted to prompt/chosen/rejected (preferences)."""
