"""`memscan demo`: the README's main job, on the built-in default."""

from __future__ import annotations

import time

import click

from memscan.cli.render import print_summary


@click.command()
@click.option("--out", default="memscan-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the model, the activations and everything after.")
@click.option("--quick", is_flag=True, help="A tiny run (seconds), as the test suite uses.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out: str, quick: bool, seed: int) -> None:
    """Build a small GPT-2 on the Question-Formation language; extract, index, query and report."""
    from memscan import demo as pipeline

    started = time.perf_counter()
    result = pipeline.run(out, quick=quick, seed=seed)
    print_summary(str(result.dataset_dir), result.manifest)
    click.echo(f"model     {result.model_dir}")
    last = result.summary["layers"][-1]
    click.echo(f"radius    typical {last['typical_radius']:.3g} vs r* {last['r_star']:.3g} at the last layer "
               f"({last['typical_over_r_star']:.2f}x)")
    click.echo(f"tests     A2 coverage at the typical radius {last['A2']['coverage_at_typical']:.1%}; "
               f"A3 disjoint at r* {last['A3']['disjoint_at_r_star']:.1%}, Ramsauer-separated "
               f"{last['A3']['ramsauer_well_separated']:.1%}; A1 retrieval {last['A1']['retrieval_rate']:.1%}")
    loss = last["A1"]["test_loss"]
    click.echo(f"loss      held-out {loss:.3f} nats vs predicted floor {last['floor']['predicted_floor']:.4g}")
    click.echo(f"report    {result.report}")
    click.echo(f"done in {time.perf_counter() - started:.1f} s")
