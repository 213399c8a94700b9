"""The command line's own text: every ``--help`` as argparse prints it."""

from __future__ import annotations

import argparse

from unibct_ray.cli import build_parser


def _parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = [(path, p)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out += _parsers(sub, path + (name,))
    return out


def test_help_prints_percent_signs_once():
    # Descriptions are printed raw, argument help goes through % formatting: a literal "%%"
    # in a description reaches the user as is.
    parsers = _parsers(build_parser())
    assert len(parsers) > 10
    for path, p in parsers:
        text = p.format_help()
        assert "%%" not in text, f"unibct-ray {' '.join(path)} --help prints '%%'"
    (eval_help,) = [p.format_help() for path, p in parsers if path == ("eval",)]
    assert "the 95% interval of the difference" in eval_help
    assert "subject resamples for 95% intervals" in eval_help


def test_train_with_fewer_epochs_notes_the_clamped_refinement(capsys):
    """`--set optim.epochs=2` alone shrinks the shipped UniBCT config: one note line on stderr,
    then the run (here its plan, on a given node: no Ray, no data) goes on."""
    from pathlib import Path

    from unibct_ray.cli import main

    cfg = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "synthetic" / "new-unibct.yaml"
    assert main(["train", "--config", str(cfg), "--set", "optim.epochs=2", "--plan", "--plan-nodes", "8"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["unibct-ray: note: new-unibct.yaml (with --set): compat.refine_epochs [2, 6] -> [1] "
                                "(optim.epochs is 2; a refinement must come before the last epoch)"]
    assert "verdict: the run can start" in out
