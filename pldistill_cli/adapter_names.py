"""The dataset adapters' names, in the order help and errors list them: one module each in datasets/,
whose registry (datasets/__init__.py) holds them under these names (tests/test_registries.py checks both
agree). Apart from datasets/ so that config and the CLI can check a name without importing a corpus parser:
every stage imports config, and graph.py would make each stage depend on every parser."""

ADAPTER_NAMES: tuple[str, ...] = ("synthetic", "ravdess", "savee", "iemocap", "emobox", "folder")
