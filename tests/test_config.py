import dataclasses
from pathlib import Path

import pytest

from scd.core.config import ConfigError, apply_overrides, from_dict, load_config, load_yaml, to_dict

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Inner:
    learning_rate: float = 1e-3
    steps: int = 10
    mode: str = "a"

    def __post_init__(self):
        if self.mode not in ("a", "b"):
            raise ValueError(f"mode must be a or b, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    tags: tuple[str, ...] = ()
    opt: int | None = None
    inner: Inner = Inner()


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_line_and_hint(tmp_path):
    p = write(tmp_path, "name: a\ninner:\n  steps: 3\n  lerning_rate: 0.1\n")
    data, src = load_yaml(p)
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, src)
    msg = str(e.value)
    assert f"{p}:4:" in msg and "inner.lerning_rate" in msg and "did you mean 'learning_rate'" in msg


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path, "name: a\nname: b\n")
    with pytest.raises(ConfigError, match=r":2: duplicate key 'name'"):
        load_yaml(p)


@pytest.mark.parametrize("text,needle", [
    ("inner:\n  steps: 1.5\n", "expected an integer"),
    ("inner:\n  steps: '3'\n", "expected an integer"),
    ("name: 3\n", "expected a string"),
    ("tags: abc\n", "expected a list"),
    ("inner: 5\n", "expected a mapping"),
    ("opt: yes\n", "expected int | None"),
])
def test_wrong_types(tmp_path, text, needle):
    data, src = load_yaml(write(tmp_path, text))
    with pytest.raises(ConfigError, match=needle):
        from_dict(Outer, data, src)


def test_contradictory_option_reported_with_key(tmp_path):
    data, src = load_yaml(write(tmp_path, "inner:\n  mode: c\n"))
    with pytest.raises(ConfigError, match="key 'inner': mode must be a or b"):
        from_dict(Outer, data, src)


def test_valid_and_overrides(tmp_path):
    data, src = load_yaml(write(tmp_path, "name: a\ninner:\n  steps: 3\n"))
    data = apply_overrides(data, ["inner.learning_rate=3e-4", "tags=[x,y]", "opt=null"])
    cfg = from_dict(Outer, data, src)
    assert cfg.inner.learning_rate == pytest.approx(3e-4) and cfg.inner.steps == 3
    assert cfg.tags == ("x", "y") and cfg.opt is None
    assert to_dict(cfg)["tags"] == ["x", "y"]


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["train.lr"])


def test_unknown_recipe_did_you_mean(tmp_path):
    p = write(tmp_path, "recipe: sfft\n")
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        load_config(p)


def test_unknown_key_in_real_recipe(tmp_path):
    p = write(tmp_path, "recipe: sft\ntrain:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError, match=r":3: key 'train.max_stpes'.*did you mean 'max_steps'"):
        load_config(p)


CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_config_validates(path):
    cfg = load_config(path)
    assert cfg.recipe
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path} must start with a comment (purpose, command, runtime)"


def test_added_field_is_left_out_of_the_resolved_config_at_its_default():
    import dataclasses

    from scd.core.config import added_field, from_dict, to_dict

    @dataclasses.dataclass(frozen=True)
    class C:
        a: int = 1
        new: dict = added_field(default_factory=dict)
        flag: bool = added_field(default=False)

    assert to_dict(C()) == {"a": 1}  # same dict (and run_id) as before the fields existed
    assert to_dict(C(new={"x": 1}, flag=True)) == {"a": 1, "new": {"x": 1}, "flag": True}
    assert from_dict(C, to_dict(C(new={"x": 1}))) == C(new={"x": 1})
