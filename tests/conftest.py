import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Generated images, judge answers and latents are cached by content; tests must neither read a user's cache nor
# leave one behind.
os.environ["COMAT_CACHE"] = tempfile.mkdtemp(prefix="comat-test-cache-")

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
