import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
