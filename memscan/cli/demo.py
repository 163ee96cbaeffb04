"""`memscan demo`: the README's main job, on the built-in default: the shipped experiment `memscan run demo`."""

from __future__ import annotations

import time

import click

from memscan import demo as pipeline
from memscan.cli import options
from memscan.cli.render import dataset_lines
from memscan.demo import DemoResult
from memscan.wording import floor_text


@click.command(cls=options.Command)
@click.option("--out", default="memscan-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the training run, the activations and everything after.")
@click.option("--quick", is_flag=True, help="A tiny run (seconds), as the test suite uses.")
@options.seed
def demo(out: str, quick: bool, seed: int) -> None:
    """Train a small GPT-2 on the Question-Formation language, then extract, index, query and report
    (experiments/demo.toml; `memscan run demo` with other settings)."""
    started = time.perf_counter()
    for line in summary_lines(pipeline.run(out, quick=quick, seed=seed)):
        click.echo(line)
    click.echo(f"done in {time.perf_counter() - started:.1f} s")


def summary_lines(result: DemoResult) -> list[str]:
    """The demo's summary: training, the dataset, the last layer's radii and tests, the floor, norms, the report."""
    trained, last = result.train, result.summary["layers"][-1]
    lines = [f"trained   {trained['steps']:,} steps on {trained['data']['train_tokens']:,} Question-Formation "
             f"tokens: train loss {trained['final_train_loss']:.3f}, held-out {trained['final_heldout_loss']:.3f}",
             *dataset_lines(str(result.dataset_dir), result.manifest),
             f"radius    typical {last['typical_radius']:.3g} vs r* {last['r_star']:.3g} at the last layer "
             f"({last['typical_over_r_star']:.2f}x)",
             f"tests     A2 coverage at the typical radius {last['A2']['coverage_at_typical']:.1%}; "
             f"A3 disjoint at r* {last['A3']['disjoint_at_r_star']:.1%}, Ramsauer-separated "
             f"{last['A3']['ramsauer_well_separated']:.1%}; A1 retrieval {last['A1']['retrieval_rate']:.1%}, "
             f"next-token agreement {last['A1']['next_token_agreement']:.1%}",
             f"loss      held-out {last['A1']['test_loss']:.3f} nats (train {last['A1']['train_loss']:.3f}); "
             f"Proposition 4's floor {floor_text(last['floor'])}"]
    growth = result.saturation["norm_growth"]
    if growth:
        best = max(growth["fits"], key=lambda law: growth["fits"][law]["r2"])
        lines.append(f"norms     best fit {best} (R^2 {growth['fits'][best]['r2']:.3f}); "
                     f"{result.saturation['argmax_heads']} of {result.saturation['heads']} saturated heads are argmax")
    return [*lines, f"report    {result.report}"]
