"""Static checks of the security rules: safe checkpoint loading, no pickle of user data, loopback only."""

import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "influencespace"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls(pattern: str):
    for path in SOURCES:
        text = path.read_text()
        for match in re.finditer(pattern, text):
            yield path, text, match


def _call_text(text: str, open_paren: int) -> str:
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren: i + 1]
    return text[open_paren:]


def test_every_torch_load_is_weights_only():
    for path, text, match in _calls(r"torch\.load\("):
        call = _call_text(text, match.end() - 1)
        assert "weights_only=True" in call, f"{path}: torch.load{call} must pass weights_only=True"


def test_call_parser_handles_nested_calls():
    assert _call_text("f(a(b), c=1) + 2", 1) == "(a(b), c=1)"


def test_no_pickle_loads_of_data():
    for path, _, match in _calls(r"\bpickle\.loads?\(|allow_pickle=True"):
        raise AssertionError(f"{path} unpickles data ({match.group(0)}); use Parquet / JSON / numpy without pickle")


def test_local_services_bind_loopback():
    for path, text, match in _calls(r"0\.0\.0\.0"):
        line = text[: match.start()].count("\n") + 1
        raise AssertionError(f"{path}:{line} binds to all interfaces; bind 127.0.0.1")
