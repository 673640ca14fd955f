"""Tasks: each module holds one task (data, tokenizer, evaluation) and the dataclass of its ``task.*``
settings. :data:`nextlat.registry.TASKS` names them."""
