import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smol_tokenizer():
    from scd.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture()
def tiny_cfg():
    from scd.models import ModelConfig, TinyConfig

    return ModelConfig(name="tiny", tiny=TinyConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, num_key_value_heads=2))
