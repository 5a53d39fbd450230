"""Names to implementations: benchmarks, judges and worlds are found through one registry mechanism."""

import importlib.metadata

import pytest

from comat.core.errors import ComatError
from comat.core.registry import Registry
from comat.core.worlds import WORLDS
from comat.evaluation.benchmark import Benchmark
from comat.evaluation.registry import BENCHMARKS, benchmark_class, benchmark_names, load_protocol, register


class _Stub:
    pass


class _Other:
    pass


def test_a_second_object_under_a_taken_name_is_refused():
    reg = Registry("thing")
    assert reg.register("a", _Stub) is _Stub
    assert reg.register("a", _Stub) is _Stub  # the same object again is no conflict
    with pytest.raises(ComatError, match=r"thing 'a' is registered twice .*_Stub and .*_Other"):
        reg.register("a", _Other)
    with pytest.raises(ComatError, match="unknown thing 'b'; available: a"):
        reg.get("b")


def test_an_adapter_cannot_take_a_registered_benchmark_name():
    benchmark_class(load_protocol("tifa", "toy"))  # registers the real adapter
    impostor = type("Tifa", (Benchmark,), {"name": "tifa", "samples": None, "score": None, "aggregate": None})
    with pytest.raises(ComatError, match="benchmark 'tifa' is registered twice"):
        register(impostor)
    assert BENCHMARKS.get("tifa").__module__ == "comat_benchmarks.tifa"


def test_benchmarks_and_worlds_come_from_entry_points():
    assert {"t2i-compbench", "tifa", "dpg-bench", "coco-fid", "attack", "sensitivity"} <= set(benchmark_names())
    for name in benchmark_names():
        protocol = load_protocol(name, "toy")
        assert benchmark_class(protocol).name == name and protocol.module.startswith("comat_benchmarks.")
    toy = WORLDS.get("toy")
    assert set(toy.default_categories) <= set(toy.categories) and toy.prompts("color", "train")
    images, captions = toy.caption_pairs(3, 0)
    assert images.shape[0] == len(captions) == 3


def test_the_adapters_install_under_a_namespaced_name():
    top_level = importlib.metadata.distribution("comat").read_text("top_level.txt").split()
    assert set(top_level) == {"comat", "comat_benchmarks"}
