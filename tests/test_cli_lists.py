"""A dataset list given on the command line replaces the config's list whole.

jsonargparse merges a command-line list item by item into a config list of the same length, so an entry given as
``--data.test=[{name: arc_c, path: P}]`` used to keep ``limit: 300`` from the config's first test entry.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moelora_lit.data import ReasoningDataModule
from moelora_lit.data.specs import DatasetSpec
from moelora_lit.lightning.cli import MoELoRACLI, replace_whole_lists
from moelora_lit.lightning.module import MoELoRAModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "smollm2_arc_easy_lora.yaml"  # test: [{name: arc_e, path: ..., limit: 300}]
TINY = str(ROOT / "moelora_lit" / "assets" / "tiny-base")
N_ROWS = 320  # more than the config's limit of 300
DEFAULTS = {f.name: f.default for f in dataclasses.fields(DatasetSpec) if f.name not in ("name", "path")}


def arc_rows(n: int) -> list[dict[str, str]]:
    """``n`` ARC rows in the LLM-Adapters format."""
    return [{"instruction": f"Please choose the correct answer to the question: What is {i} + 1?\n\n"
                            f"Answer1: {i + 1} Answer2: {i + 2} Answer3: {i} Answer4: {i + 3}\n\n"
                            "Answer format: answer1/answer2/answer3/answer4",
             "input": "", "output": "the correct answer is answer1", "answer": "answer1"} for i in range(n)]


@pytest.fixture
def arc_file(tmp_path: Path) -> str:
    path = tmp_path / "arc_c.json"
    path.write_text(json.dumps(arc_rows(N_ROWS)))
    return str(path)


class _ParseOnly(MoELoRACLI):
    def instantiate_classes(self) -> None:  # the config as parsed, nothing built
        pass


def common_args(tmp_path: Path) -> list[str]:
    return ["--config", str(CONFIG), "--model.base_model", TINY, "--model.scoring", "loglikelihood",
            "--model.loglik_prompt", "harness", "--trainer.default_root_dir", str(tmp_path)]


def test_the_config_has_what_could_be_inherited() -> None:
    cli = _ParseOnly(MoELoRAModule, ReasoningDataModule, run=False, args=["--config", str(CONFIG)])
    (test,), (train,) = cli.config.data.test, cli.config.data.train
    assert (test.limit, train.limit) == (300, 2000)


def test_a_command_line_list_replaces_the_config_entries_whole(tmp_path: Path, arc_file: str) -> None:
    args = [*common_args(tmp_path), f"--data.train=[{{name: arc_e, path: {arc_file}}}]",
            f"--data.test=[{{name: arc_c, path: {arc_file}}}]"]
    cli = MoELoRACLI(MoELoRAModule, ReasoningDataModule, run=False, args=args)
    for split, name in (("train", "arc_e"), ("test", "arc_c")):
        (spec,) = cli.config.data[split]
        assert (spec.name, spec.path) == (name, arc_file)
        assert {k: spec[k] for k in DEFAULTS} == DEFAULTS, spec  # no limit (or anything else) inherited
    (part,) = cli.datamodule.parts["test"]
    assert part.display == "arc_c" and len(part.rows) == N_ROWS


def test_no_field_of_an_earlier_entry_survives(tmp_path: Path, arc_file: str) -> None:
    every = {"name": "arc_e", "path": arc_file, "hub_id": "allenai/ai2_arc", "hub_config": "ARC-Easy",
             "split": "validation", "limit": 5, "alias": "earlier", "offset": 2, "response": "option_first",
             "task_group": 1}
    assert set(every) == {f.name for f in dataclasses.fields(DatasetSpec)}
    stacked = tmp_path / "stacked.yaml"
    stacked.write_text(json.dumps({"data": {"test": [every], "val": [every]}}))
    for form in (["--data.test=[{name: arc_c, path: P}]", "--data.val=[{name: arc_c, path: P}]"],
                 ["--data.test", "[{name: arc_c, path: P}]", "--data.val", "[{name: arc_c, path: P}]"]):
        args = [*common_args(tmp_path), "--config", str(stacked), *[a.replace("P", arc_file) for a in form]]
        config = _ParseOnly(MoELoRAModule, ReasoningDataModule, run=False, args=args).config.data
        for split in ("test", "val"):
            (spec,) = config[split]
            assert {k: spec[k] for k in DEFAULTS} == DEFAULTS, (form, split, spec)


def test_append_keeps_the_config_entries_and_adds_one_with_defaults(tmp_path: Path, arc_file: str) -> None:
    args = [*common_args(tmp_path), f"--data.test+={{name: arc_c, path: {arc_file}}}"]
    earlier, added = _ParseOnly(MoELoRAModule, ReasoningDataModule, run=False, args=args).config.data.test
    assert (earlier.name, earlier.limit) == ("arc_e", 300)
    assert added.name == "arc_c" and {k: added[k] for k in DEFAULTS} == DEFAULTS


def test_replace_whole_lists_touches_only_the_dataset_lists() -> None:
    args = ["test", "--data.test=[{name: a}]", "--data.val", "[{name: b}]", "--data.test+={name: c}",
            "--data.batch_size=4", "--data.tests=x"]
    assert replace_whole_lists(args) == ["test", "--data.test=null", "--data.test=[{name: a}]", "--data.val=null",
                                         "--data.val", "[{name: b}]", "--data.test+={name: c}",
                                         "--data.batch_size=4", "--data.tests=x"]
