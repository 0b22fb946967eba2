"""Shared test set-up: offline, deterministic, small."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Small models on a 2-core machine: more than one intra-op thread per process only adds contention
# (seen 50x slower with other work running).
torch.set_num_threads(1)

TINY_WORDS = "what color is the circle square triangle red green blue yellow how many are there left right of yes no 0 1 2 3 4".split()


@pytest.fixture(scope="session")
def random_tiny_dirs(tmp_path_factory):
    """Random-init tiny models of the three families saved with save_pretrained: {family: path}."""
    import torch

    from vrp_eval.zoo.build import FAMILIES, build_tiny

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("random-tiny")
    paths = {}
    for family in FAMILIES:
        model, processor = build_tiny(family, TINY_WORDS, seed=1)
        path = root / family
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths[family] = path
    return paths


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback fake Hub (tests/fakehub.py) that the real huggingface_hub client may talk to.

    HF_HUB_OFFLINE=1 (set above) makes huggingface_hub refuse *every* request, loopback included: it
    reads the variable once at import into `constants.HF_HUB_OFFLINE`. For this fixture's tests only,
    offline mode is lifted and the default endpoint points at 127.0.0.1, so a call that forgets its
    `endpoint` still cannot reach huggingface.co; monkeypatch restores both afterwards.
    """
    from fakehub import FakeHub
    from huggingface_hub import constants

    with FakeHub(token="hf_fake_secret_token_0123456789") as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub
