import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One trainkit cache for the whole session: the GGUF converts and Shakespeare tokenizes once."""
    return tmp_path_factory.mktemp("trainkit-cache")
