import pytest

from scd.core.registry import Registry, RegistryError, registry


def test_register_get_build():
    reg = Registry("thing")

    @reg.register("adder")
    def adder(a, b=1):
        return a + b

    assert reg.get("adder") is adder
    assert reg.build("adder", a=2, b=3) == 5
    assert "adder" in reg and reg.names() == ["adder"]


def test_unknown_name_did_you_mean():
    reg = Registry("loss")
    reg.add("forward_kl", object())
    with pytest.raises(RegistryError) as e:
        reg.get("forwrd_kl")
    msg = str(e.value)
    assert "unknown loss 'forwrd_kl'" in msg and "did you mean 'forward_kl'" in msg


def test_unknown_name_without_close_match_lists_known():
    reg = Registry("loss")
    reg.add("forward_kl", object())
    msg = str(pytest.raises(RegistryError, reg.get, "zzz").value)
    assert "did you mean" not in msg and "known: forward_kl" in msg


def test_duplicate_registration_fails_unless_override():
    reg = Registry("x")
    reg.add("a", 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("a", 2)
    reg.add("a", 2, override=True)
    assert reg.get("a") == 2


def test_registry_is_process_wide():
    assert registry("some-kind-for-test") is registry("some-kind-for-test")
