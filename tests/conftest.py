"""Shared test setup: offline everything, small CPU thread count, tiny generated shards."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """A few hundred 32x32 demo shapes in real WebDataset shards: {"train": pattern, "val": pattern}."""
    from data.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    return write_shapes(str(out), n_train=192, n_val=32, size=32, max_count=48, seed=0)
