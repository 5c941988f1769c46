"""The evaluation harness: press specs, the sweep engine against a plain loop, resuming, outputs, CLI."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import re

import pytest
import torch

import curdkv
from curdkv.cli.main import main as cli_main
from curdkv.context import answer_greedily
from curdkv.eval import sweep as sweep_module
from curdkv.eval.families import longbench_family, ruler_family
from curdkv.eval.results import SUMMARY_COLUMNS
from curdkv.eval.run import TaskFamily, prepare_samples, report
from curdkv.eval.sample import EvalSample, read_samples, write_samples
from curdkv.eval.sweep import Config, Sweep, merge_ranks, read_predictions, record_key, sweep_configs
from curdkv.models import random_config
from curdkv.presses import parse_press_spec
from conftest import needs_smollm2


# ------------------------------------------------------------------------------------------ press specs


def test_press_spec_parsing():
    assert parse_press_spec("curdkv") == ("curdkv", {})
    assert parse_press_spec("CurDKV:leverage=key:local_window=16") == ("curdkv", {"leverage": "key", "local_window": 16})
    assert parse_press_spec("curdkv:projection_dim=none") == ("curdkv", {"projection_dim": None})
    assert parse_press_spec("adacurdkv:alpha=0.5") == ("adacurdkv", {"alpha": 0.5})
    press = curdkv.get_press("curdkv:estimator=exact:leverage=value", 0.5)
    assert (press.estimator, press.leverage, press.compression_ratio) == ("exact", "value", 0.5)
    assert curdkv.get_press("adacurdkv:alpha=0.5", 0.3).alpha == 0.5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", r"press must be one of .*'curdkv'.*got 'nope'"),
        ("curdkv:leverage", r"name:option=value"),
        ("curdkv:=key", r"name:option=value"),
        ("curdkv:colour=red", r"press 'curdkv:colour=red'.*colour"),
        ("curdkv:leverage=bad", r"leverage must be one of"),
        ("", r"non-empty"),
    ],
)
def test_bad_press_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        curdkv.get_press(spec, 0.5)


def test_sweep_configs_full_first_extras_deduplicated():
    configs = sweep_configs(["curdkv", "knorm"], [0.5, 0.9], [(["curdkv", "curdkv:leverage=key"], [0.5])])
    assert configs == [
        Config("full", 0.0), Config("curdkv", 0.5), Config("curdkv", 0.9), Config("knorm", 0.5), Config("knorm", 0.9),
        Config("curdkv:leverage=key", 0.5),
    ]
    with pytest.raises(ValueError, match=r"ratios must be in \(0, 1\)"):
        sweep_configs(["curdkv"], [0.0])
    with pytest.raises(ValueError, match="leverage must be one of"):
        sweep_configs(["curdkv"], [0.5], [(["curdkv:leverage=nope"], [0.5])])


CAL = "compactor:calibration_alpha=0.5:calibration_beta=-2.0"


def test_calibrated_ratios_parse_and_refuse_presses_that_cannot_calibrate():
    configs = sweep_configs([CAL], ["calibrated:0.1", 0.5])
    assert configs[1] == Config(CAL, 0.0, 0.1) and configs[1].label == CAL + "@calibrated:0.1"
    assert configs[2] == Config(CAL, 0.5)
    for bad in ("calibrated:0", "calibrated:1.5", "calibrated:x", "calibrate:0.1"):
        with pytest.raises(ValueError, match="ratios"):
            sweep_configs([CAL], [bad])
    with pytest.raises(ValueError, match="cannot choose its ratio per context"):
        sweep_configs(["snapkv"], ["calibrated:0.1"])
    with pytest.raises(ValueError, match="cannot choose its ratio per context"):
        sweep_configs(["compactor"], ["calibrated:0.1"])  # no fitted curve


def test_calibrated_config_chooses_ratio_from_the_capture(tiny_models):
    from curdkv.presses.calibration import CalibrationCurve, calibrated_ratio
    from curdkv.runtime.nll import context_nll

    model = tiny_models("tiny-llama", torch.float32)
    ids = torch.randint(3, 200, (1, 150), generator=torch.Generator().manual_seed(0))
    capture = curdkv.capture_prefill(model, ids, query_window=curdkv.presses.base.ALL_QUERIES)
    press = Config(CAL, 0.0, 0.1).build_for(capture)
    expected = calibrated_ratio(CalibrationCurve(0.5, -2.0), context_nll(model, ids), 0.1)
    assert press.compression_ratio == pytest.approx(expected) and 0.0 < expected < 1.0


def test_summary_has_one_row_per_calibrated_press_with_the_mean_ratio():
    from curdkv.eval.results import results_table, summarize

    label = CAL + "@calibrated:0.1"
    records = [
        {"model": "m", "task": "t", "length": 0, "index": i, "press": "full", "compression_ratio": 0.0,
         "prediction": "a", "score": 100.0} for i in range(2)
    ] + [
        {"model": "m", "task": "t", "length": 0, "index": i, "press": label, "compression_ratio": r,
         "prediction": p, "score": s, "calibration_tolerance": 0.1}
        for i, (r, p, s) in enumerate([(0.2, "a", 100.0), (0.6, "b", 0.0)])
    ]
    rows = summarize(records)
    cal = [r for r in rows if r["press"] == label]
    assert len(cal) == 1
    assert cal[0]["compression_ratio"] == pytest.approx(0.4) and cal[0]["score"] == 50.0
    assert cal[0]["calibrated"] == 0.1 and cal[0]["fidelity"] == 50.0
    assert "mean ratio 40%" in results_table(rows)


# ------------------------------------------------------------------------------- sweep vs a plain loop


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A float32 tiny Llama with SmolLM2's vocabulary, so real text goes through it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = random_config("tiny-llama", vocab_size=len(tokenizer))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def _samples(n: int = 3) -> list[EvalSample]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    out = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(360))
        out.append(EvalSample(task="toy", index=i, context=f"Text {i}: {text}\n", question="Which word comes first?",
                              answers=(words[i],), metric="contains", answer_prefix=" Answer:", max_new_tokens=6,
                              length=256))
    return out


def _score(sample, prediction):
    return 100.0 * any(a in prediction for a in sample.answers)


CONFIGS = sweep_configs(["curdkv", "adacurdkv", "snapkv", "streamingllm", "curdkv:leverage=value"], [0.5, 0.75])


def _plain_loop(model, tokenizer, samples, configs):
    answers = {}
    for sample in samples:
        for config in configs:
            ctx = curdkv.prefill(model, tokenizer, sample.context, config.build())
            answers[(sample.index, config.press, config.ratio)] = answer_greedily(
                model, tokenizer, ctx.cache, ctx.context_length, sample.question, sample.max_new_tokens,
                sample.answer_prefix, separator="")[0]
    return answers


@pytest.mark.parametrize("batch_size", [1, len(CONFIGS)])
def test_sweep_answers_equal_a_fresh_prefill_per_configuration(tiny, tokenizer, tmp_path, batch_size):
    samples = _samples(2)
    sweep = Sweep(tiny, tokenizer, "tiny", CONFIGS, tmp_path, _score, batch_size)
    sweep.run(samples)
    records = read_predictions(tmp_path)
    assert len(records) == len(samples) * len(CONFIGS)
    expected = _plain_loop(tiny, tokenizer, samples, CONFIGS)
    got = {(r["index"], r["press"], r["compression_ratio"]): r["prediction"] for r in records}
    assert got == expected
    assert len(set(expected.values())) > 1  # the configurations really differ
    full_bytes = {r["index"]: r["kv_bytes"] for r in records if r["press"] == "full"}
    for r in records:
        if r["press"] != "full":
            # kv_bytes is what the compressed cache holds: about (1 - ratio) of the full cache
            assert r["kv_bytes"] < full_bytes[r["index"]] * (1 - r["compression_ratio"]) + 4096
        assert r["score"] == _score(samples[r["index"]], r["prediction"])


def test_sweep_resumes_without_redoing_answers(tiny, tokenizer, tmp_path):
    samples = _samples(2)
    configs = CONFIGS[:4]
    Sweep(tiny, tokenizer, "tiny", configs, tmp_path, _score).run(samples)
    path = tmp_path / "predictions.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 8
    calls = []
    sweep = Sweep(tiny, tokenizer, "tiny", configs, tmp_path, _score)
    original = sweep.answer
    sweep.answer = lambda sample, cs: calls.append((sample.index, list(cs))) or original(sample, cs)
    sweep.run(samples)
    assert calls == [] and path.read_text().splitlines() == lines
    # An interrupted run: two records lost and the last line cut short.
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    sweep.run(samples)
    assert [(i, [c.press for c in cs]) for i, cs in calls] == [(1, [configs[1].press, configs[2].press, configs[3].press])]
    assert sorted(map(sweep_module.record_key, read_predictions(tmp_path))) == sorted(
        sweep_module.record_key(json.loads(l)) for l in lines)


def test_ranks_take_every_nth_sample_and_merge_into_the_one_process_outputs(tiny, tokenizer, tmp_path, monkeypatch):
    from curdkv.eval.results import write_outputs

    # Two tasks whose names sort the other way round from the run's order, so that an
    # alphabetical merge would reorder the summary.
    samples = [dataclasses.replace(s, task=task, index=i) for task in ("zeta", "alpha")
               for i, s in enumerate(_samples(2))]
    configs = CONFIGS[:2]
    for rank in (0, 1):
        monkeypatch.setattr(sweep_module, "distributed_rank", lambda rank=rank: (rank, 2))
        Sweep(tiny, tokenizer, "tiny", configs, tmp_path, _score).run(samples)
    monkeypatch.setattr(sweep_module, "distributed_rank", lambda: (0, 1))
    assert {p.name for p in tmp_path.iterdir()} == {"predictions-rank0.jsonl", "predictions-rank1.jsonl"}
    rank1 = [json.loads(l)["index"] for l in (tmp_path / "predictions-rank1.jsonl").read_text().splitlines()]
    assert set(rank1) == {1}
    merge_ranks(tmp_path, samples, configs)
    assert {p.name for p in tmp_path.iterdir()} == {"predictions.jsonl"}
    single = tmp_path / "single"
    Sweep(tiny, tokenizer, "tiny", configs, single, _score).run(samples)
    in_order = lambda rs: [(record_key(r), r["prediction"]) for r in rs]  # noqa: E731
    assert in_order(read_predictions(tmp_path)) == in_order(read_predictions(single))
    merged, alone = tmp_path / "merged-out", tmp_path / "single-out"
    write_outputs(read_predictions(tmp_path), merged)
    write_outputs(read_predictions(single), alone)
    assert (merged / "summary.csv").read_text() == (alone / "summary.csv").read_text()
    assert [r["task"] for r in csv.DictReader(open(merged / "summary.csv"))][0] == "zeta"


# ----------------------------------------------------------------------------------- samples and outputs


def test_samples_round_trip_and_are_pinned_to_their_settings(tmp_path):
    samples = _samples(2) + [EvalSample("lb", 0, "c", "q", ("a", "b"), "qa_f1", extra={"all_classes": ["x"]})]
    write_samples(samples, tmp_path / "s.jsonl")
    assert read_samples(tmp_path / "s.jsonl") == samples
    assert read_samples(tmp_path / "s.jsonl")[2].extra == {"all_classes": ["x"]}

    built = []
    family = TaskFamily("toy", lambda tok, n: built.append(n) or samples, _score, params={"seed": 0})
    assert prepare_samples(family, "m", object(), 4096, tmp_path) == samples
    assert prepare_samples(family, "m", object(), 4096, tmp_path) == samples
    assert built == [4096]  # the second call read the file
    other = TaskFamily("toy", lambda tok, n: samples, _score, params={"seed": 1})
    with pytest.raises(ValueError, match=r"holds samples built with .*'seed': 0.*use another --out"):
        prepare_samples(other, "m", object(), 4096, tmp_path)
    empty = TaskFamily("toy", lambda tok, n: [], _score)
    with pytest.raises(ValueError, match="produced no samples"):
        prepare_samples(empty, "m", object(), 4096, tmp_path / "empty")


def _records():
    rows = []
    for index in range(4):
        for press, ratio, pred in [("full", 0.0, "a"), ("curdkv", 0.5, "a" if index < 3 else "b"),
                                   ("knorm", 0.5, "b"), ("curdkv", 0.9, "b")]:
            for task in ("t2", "t1"):
                rows.append({"model": "m", "task": task, "length": 4096, "index": index, "press": press,
                             "compression_ratio": ratio, "prediction": pred, "answers": ["a"],
                             "score": 100.0 * (pred == "a")})
    return rows


def test_outputs_summary_table_plot_and_fidelity(tmp_path):
    from curdkv.eval.results import write_outputs

    rows = write_outputs(_records(), tmp_path, {"both": ["t1", "t2"]}, "toy")
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == SUMMARY_COLUMNS
    cell = {(r["task"], r["press"], float(r["compression_ratio"])): r for r in table}
    assert float(cell[("t1", "full", 0.0)]["score"]) == 100 and cell[("t1", "full", 0.0)]["n"] == "4"
    assert float(cell[("t1", "curdkv", 0.5)]["score"]) == 75 and float(cell[("t1", "curdkv", 0.5)]["fidelity"]) == 75
    assert float(cell[("t1", "knorm", 0.5)]["fidelity"]) == 0
    assert [r["task"] for r in rows][:1] == ["t2"]  # the run's task order, not the alphabet
    md = (tmp_path / "results.md").read_text()
    assert "### compression 50%" in md and "### compression 90%" in md
    assert "| **both** (2 tasks) | 100.00 |  75.00 |  0.00 |" in md
    assert md.index("| task ") < md.index("curdkv") < md.index("knorm")
    png = (tmp_path / "average_vs_ratio.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_plot_shows_the_average_over_the_most_tasks():
    from curdkv.eval.results import widest_average

    ruler = {"niah": ["a", "b"], "ruler": ["a", "b", "c"]}
    assert widest_average(ruler) == ("ruler", ["a", "b", "c"])
    assert widest_average({"average": ["a", "b", "c"], "single-doc": ["a"]}) == ("average", ["a", "b", "c"])
    assert widest_average(None) == ("average", None)


def test_report_renders_a_subset(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    with pytest.raises(ValueError, match="settings.json is missing"):
        report(run)
    (run / "settings.json").write_text(json.dumps({"family": "toy", "model": "m", "averages": {"all": ["t1", "t2"]}}))
    rows = report(run, tmp_path / "sub", presses=["curdkv"], ratios=[0.9])
    assert {(r["press"], r["compression_ratio"]) for r in rows} == {("full", 0.0), ("curdkv", 0.9)}
    assert "knorm" not in (tmp_path / "sub" / "results.md").read_text()
    with pytest.raises(ValueError, match=r"presses \['snapkv'\] are not in the run"):
        report(run, tmp_path / "x", presses=["snapkv"])


# ---------------------------------------------------------------------------------------- families, CLI


def test_family_settings_are_checked():
    with pytest.raises(ValueError, match="tasks must be among"):
        ruler_family(["niah_single_9"])
    with pytest.raises(ValueError, match="lengths must be integers >= 256"):
        ruler_family(lengths=[100])
    with pytest.raises(ValueError, match="tasks must be among"):
        longbench_family("/nowhere", ["hotpotqa_x"])
    family = ruler_family(["niah_single_1"], lengths=[8192], num_samples=1)
    with pytest.raises(ValueError, match="all exceed the model's context of 4096"):
        family.samples(object(), 4096)


def test_archived_predictions_are_read_and_resumed_and_a_redone_answer_wins(tiny, tokenizer, tmp_path):
    samples = _samples(1)
    Sweep(tiny, tokenizer, "tiny", CONFIGS, tmp_path, _score).run(samples)
    plain = tmp_path / "predictions.jsonl"
    lines = plain.read_text().splitlines()
    (tmp_path / "predictions.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    plain.unlink()
    assert len(read_predictions(tmp_path)) == len(CONFIGS)
    sweep = Sweep(tiny, tokenizer, "tiny", CONFIGS, tmp_path, _score)
    assert sum(len(c) for _, c in sweep.pending(samples)) == 0  # nothing to redo
    redone = dict(json.loads(lines[0]), prediction="redone")
    plain.write_text(json.dumps(redone) + "\n")
    records = read_predictions(tmp_path)
    assert len(records) == len(CONFIGS)
    assert [r["prediction"] for r in records if record_key(r) == record_key(redone)] == ["redone"]


def test_longbench_family_through_the_sweep(tiny, tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    record = {"input": "Who wrote the letter?", "context": "Anna wrote a letter to Bob. " * 30, "answers": ["Anna"],
              "length": 180, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "h0"}
    (data / "hotpotqa.jsonl").write_text(json.dumps(record) + "\n")
    family = longbench_family(data, ["hotpotqa"], max_tokens=128)
    samples = family.samples(tokenizer, 4096)
    assert len(samples) == 1 and samples[0].extra["truncated"]
    assert family.scorer(samples[0], "Anna") == 100.0 and family.scorer(samples[0], "Bob") == 0.0
    Sweep(tiny, tokenizer, "tiny", CONFIGS[:3], tmp_path / "run", family.scorer).run(samples)
    assert len(read_predictions(tmp_path / "run")) == 3
    assert "multi-doc QA" in family.averages and family.averages["average"] == ["hotpotqa"]


def test_cli_rejects_bad_arguments(capsys):
    for argv, message in [
        (["eval", "ruler", "--presses", "curdkv,bogus", "--out", "x"], "--presses"),
        (["eval", "ruler", "--ratios", "0.5,1.5", "--out", "x"], "--ratios"),
        (["eval", "ruler", "--ratios", "0", "--out", "x"], "full cache is always run"),
        (["eval", "ruler", "--lengths", "4k", "--out", "x"], "--lengths"),
        (["eval", "ruler", "--extra", "curdkv", "--out", "x"], "PRESSES@RATIOS"),
        (["eval", "longbench", "--out", "x"], "--data"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert cli_main(["eval", "ruler", "--tasks", "nope", "--out", "x"]) == 2
    assert "tasks must be among" in capsys.readouterr().err


def test_cli_checks_context_lengths_before_loading_a_model(capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("curdkv.eval.run.load_model", no_load)
    monkeypatch.setattr("curdkv.cli.demo.load_model", no_load)
    for argv, command in [
        (["eval", "ruler", "--presses", "curdkv:num_sinks=100000", "--ratios", "0.5", "--out", "x"], "eval"),
        (["eval", "ruler", "--presses", "snapkv", "--ratios", "0.99", "--lengths", "1024", "--out", "x"], "eval"),
        (["demo", "--presses", "curdkv:num_sinks=100000"], "demo"),
    ]:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert f"curdkv {command}: error:" in err and re.search(r"protect(s|ed tokens) \(num_sinks=", err)


@needs_smollm2
def test_cli_ruler_end_to_end_on_smollm2(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "ruler", "--model", "smollm2-135m", "--tasks", "niah_single_1,vt", "--samples", "2",
            "--lengths", "1024", "--presses", "knorm,streamingllm", "--ratios", "0.5",
            "--extra", "curdkv:estimator=exact@0.5", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "### compression 50%" in printed and "curdkv:estimator=exact" in printed
    assert {p.name for p in out.iterdir()} >= {"samples.jsonl", "samples.json", "predictions.jsonl", "summary.csv",
                                                "results.md", "average_vs_ratio.png", "settings.json"}
    records = read_predictions(out)
    assert len(records) == 2 * 2 * 4  # tasks x samples x (full + 3 configurations)
    full = [r for r in records if r["press"] == "full" and r["task"] == "niah_single_1"]
    assert all(r["score"] == 100.0 for r in full)  # SmolLM2 finds a 1K needle with the full cache
    settings = json.loads((out / "settings.json").read_text())
    assert settings["lengths"] == [1024] and ["knorm", 0.5] in settings["configs"]
    # A rerun answers nothing new and leaves the predictions as they were.
    before = (out / "predictions.jsonl").read_text()
    assert cli_main(argv) == 0
    assert (out / "predictions.jsonl").read_text() == before


def test_pending_interleaves_tasks_so_partial_runs_cover_every_task(tiny, tokenizer, tmp_path):
    samples = [EvalSample(task=t, index=i, context="x", question="q?", answers=("a",), metric="m")
               for t in ("a", "b", "c") for i in range(3)]
    sweep = Sweep(tiny, tokenizer, "tiny", CONFIGS[:2], tmp_path, _score)
    order = [(s.task, s.index) for s, _ in sweep.pending(samples)]
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2)]


def test_prefill_costs_take_each_samples_most_expensive_build():
    from curdkv.eval.results import prefill_costs

    def record(press, index, ratio, prefill, compression):
        return {"press": press, "model": "m", "task": "t", "length": 10, "index": index, "compression_ratio": ratio,
                "prefill_seconds": prefill, "compression_seconds": compression}

    records = [record("full", 0, 0.0, 2.0, 0.0),
               record("kvzip", 0, 0.5, 2.0, 4.0), record("kvzip", 0, 0.9, 2.0, 0.1),  # 3x, the scoring build
               record("kvzip", 1, 0.5, 1.0, 1.0), record("kvzip", 1, 0.9, 1.0, 0.1),  # 2x
               record("kvzip", 2, 0.5, 1.0, 3.0),  # 4x
               record("knorm", 0, 0.5, 2.0, 0.02), {"press": "knorm", "model": "m", "task": "t", "length": 10,
                                                    "index": 1, "compression_ratio": 0.5}]  # an old, untimed record
    costs = {c["press"]: c for c in prefill_costs(records)}
    assert costs["kvzip"] == {"press": "kvzip", "prefill_cost": 3.0, "samples": 3}
    assert costs["knorm"]["prefill_cost"] == pytest.approx(1.01) and costs["knorm"]["samples"] == 1
    assert "full" not in costs
