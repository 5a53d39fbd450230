import dataclasses

import pytest
import yaml

from comat.core.config import RESOLVED_NAME, load_config, write_resolved
from comat.core.errors import ComatError


@dataclasses.dataclass
class Lora:
    rank: int = 128
    targets: tuple[str, ...] = ("to_q", "to_k")


@dataclasses.dataclass
class Cfg:
    model: str = "toy"
    lr: float = 5e-5
    stop_grad: bool = True
    ckpt: str | None = None
    lora: Lora = dataclasses.field(default_factory=Lora)


def test_defaults_file_then_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('model = "sd15"\n[lora]\nrank = 64\n')
    cfg = load_config(Cfg, tmp_path / "c.toml", ["lora.targets=to_v,to_out.0", "stop_grad=false", "lr=1e-4"])
    assert cfg == Cfg(model="sd15", lr=1e-4, stop_grad=False, lora=Lora(rank=64, targets=("to_v", "to_out.0")))
    for inline in ("[to_v, to_out.0]", '["to_v", "to_out.0"]', "to_v,to_out.0"):
        assert load_config(Cfg, None, [f"lora.targets={inline}"]).lora.targets == ("to_v", "to_out.0")


def test_yaml_and_none(tmp_path):
    (tmp_path / "c.yaml").write_text("ckpt: runs/a\nlora: {rank: 8}\n")
    cfg = load_config(Cfg, tmp_path / "c.yaml", ["ckpt=none"])
    assert cfg.ckpt is None and cfg.lora.rank == 8 and cfg.lora.targets == ("to_q", "to_k")


@pytest.mark.parametrize(
    "text, name, overrides, message",
    [
        ("lora = [\n", "c.toml", [], r"c.toml' is malformed"),
        ("a: [\n", "c.yaml", [], r"c.yaml' is malformed \(line 2"),
        ("lorra = 1\n", "c.toml", [], r"c.toml: unknown field 'lorra'; valid fields are model"),
        ("", "c.toml", ["lora.rank=abc"], r"lora.rank: 'abc' is not a valid int"),
        ("", "c.toml", ["stop_grad=maybe"], r"not a boolean"),
        ("", "c.toml", ["rank"], r"must look like field=value"),
        ("", "c.toml", ["lora.targets=[to_q"], r"lora.targets: '\[to_q' is not a list; write it as \[a, b\]"),
        ("- 1\n", "c.yaml", [], r"must hold a mapping"),
        ("", "c.ini", [], r"unknown format '.ini'"),
    ],
)
def test_bad_config_is_one_line(tmp_path, text, name, overrides, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ComatError, match=message) as err:
        load_config(Cfg, tmp_path / name, overrides)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ComatError, match="does not exist"):
        load_config(Cfg, tmp_path / "none.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Cfg, None, ["lora.rank=4"])
    path = write_resolved(cfg, tmp_path, {"note": "x"})
    assert path.name == RESOLVED_NAME
    data = yaml.safe_load(path.read_text())
    assert data["note"] == "x"
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(data["config"]))
    assert load_config(Cfg, tmp_path / "again.yaml") == cfg
