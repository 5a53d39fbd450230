import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Generated images, judge answers and latents are cached by content; tests must neither read a user's cache nor
# leave one behind.
os.environ["COMAT_CACHE"] = tempfile.mkdtemp(prefix="comat-test-cache-")
# One thread and one generation process unless a test asks for more: tiny models gain nothing from either, and a
# command run in this process (CliRunner) would otherwise widen torch's threads for every later test.
os.environ.setdefault("COMAT_THREADS", "1")
os.environ.setdefault("COMAT_PROCESSES", "1")

import pytest
import torch

torch.set_num_threads(1)  # tiny models: more threads only add contention on a shared 2-core machine


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from tests.tiny import tiny_sd_pipeline

    d = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from tests.tiny import tiny_sdxl_pipeline

    d = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(d)
    return d
