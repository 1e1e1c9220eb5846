"""``tmrl-trainer export``: the command-line entry of :mod:`tmrl_trainer.policy_export` (argument parsing only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from tmrl_common.atomic_file import file_on_the_way


def export_command(
    source: Path = typer.Argument(..., help="A run's policy.safetensors, or a checkpoint (checkpoints/checkpoint-*.safetensors of a trainer service, checkpoints/latest.safetensors of train-local).",
                                  exists=True, dir_okay=False),
    onnx: Path | None = typer.Option(None, "--onnx", help="Write the deterministic actor as ONNX here (a name ending "
                                                          "in .onnx; its folder is created if missing).", dir_okay=False),
    policy: Path | None = typer.Option(None, "--policy-out", help="Write a policy file here (what tmrl-worker eval and "
                                                              "--expert --policy read; its folder is created if missing).",
                                       dir_okay=False),
    check: bool | None = typer.Option(None, "--check/--no-check", show_default=False,
                                      help="Run the ONNX file with onnxruntime beside torch and print the largest "
                                           "difference. Default: when onnxruntime is installed; --check fails (exit 1) "
                                           "without it."),
) -> None:
    """Export the policy of a trainer run: ONNX (a robot loop without Python or torch) and/or a policy file."""
    from tmrl_common.networks import weights_update_from_actor

    from tmrl_trainer.policy_export import ExportError, check_onnx, export_onnx, load_actor
    from tmrl_trainer.service import export_policy

    if onnx is None and policy is None:
        raise typer.BadParameter("give --onnx FILE and/or --policy-out FILE")
    if onnx is not None and onnx.suffix.lower() != ".onnx":  # tmrl-worker eval tells the two formats by the name
        typer.echo(f"tmrl-trainer export: --onnx {onnx}: an ONNX file's name must end in .onnx", err=True)
        raise typer.Exit(code=2)
    _refuse_clobbering(source, [output for output in (policy, onnx) if output is not None])
    try:
        actor, version = load_actor(source)
    except ExportError as exc:
        typer.echo(f"tmrl-trainer export: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    except OSError as exc:  # e.g. no permission to read it
        typer.echo(f"tmrl-trainer export: cannot read {source}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=2) from exc
    if policy is not None:
        with _one_line_write_error(policy):
            export_policy(weights_update_from_actor(actor, version), policy)
        typer.echo(f"policy file (weights version {version}): {policy}")
    if onnx is not None:
        with _one_line_write_error(onnx):
            export_onnx(actor, onnx, version)
        typer.echo(f"ONNX (weights version {version}, inputs in observation order): {onnx}")
    if onnx is not None and check is not False:
        try:
            difference = check_onnx(actor, onnx)
        except ImportError:
            if check:  # asked for by name: an export that could not be checked is not the export asked for
                typer.echo("tmrl-trainer export: --check needs onnxruntime, which is not installed (pip install "
                           "onnxruntime); the ONNX file was written but not run", err=True)
                raise typer.Exit(code=1) from None
            typer.echo("onnxruntime is not installed: the ONNX file was not run (pip install onnxruntime)", err=True)
            return
        typer.echo(f"onnxruntime vs torch on 64 random observations: largest |difference| {difference:.2e}")
        if difference > 1e-5:
            typer.echo("tmrl-trainer export: onnxruntime disagrees with torch by more than 1e-5", err=True)
            raise typer.Exit(code=1)


def _refuse_clobbering(source: Path, outputs: list[Path]) -> None:
    """Exit 2 before anything is written when an output is the source (a checkpoint would be replaced by its actor
    alone), both outputs are one file, or an output exists and is not a regular file (a device, a folder): the
    export replaces its output by renaming a new file over it."""
    try:  # a name longer than the file system takes (ENAMETOOLONG) raises from resolve() and exists()
        _check_outputs(source, outputs)
    except OSError as exc:
        typer.echo(f"tmrl-trainer export: cannot use {exc.filename or 'an output path'}: {exc.strerror or exc}",
                   err=True)
        raise typer.Exit(code=2) from exc


def _check_outputs(source: Path, outputs: list[Path]) -> None:
    seen = {source.resolve(): "the source"}
    for output in outputs:
        resolved = output.resolve()
        if resolved in seen:
            typer.echo(f"tmrl-trainer export: {output} is {seen[resolved]}; write to another file", err=True)
            raise typer.Exit(code=2)
        blocking = file_on_the_way(output)
        if blocking is not None:
            typer.echo(f"tmrl-trainer export: {output}: {blocking} is a file, not a folder", err=True)
            raise typer.Exit(code=2)
        if output.exists() and not output.is_file():
            typer.echo(f"tmrl-trainer export: {output} exists and is not a regular file; write to a file", err=True)
            raise typer.Exit(code=2)
        seen[resolved] = "the other output"


@contextmanager
def _one_line_write_error(output: Path) -> Iterator[None]:
    """Turn the export's errors while writing ``output`` into one line on stderr and exit status 2: an
    :class:`~tmrl_trainer.policy_export.ExportError`, or an :class:`OSError` (its folder cannot be created, no
    permission, disk full...)."""
    from tmrl_trainer.policy_export import ExportError

    try:
        yield
    except ExportError as exc:
        typer.echo(f"tmrl-trainer export: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    except OSError as exc:
        typer.echo(f"tmrl-trainer export: cannot write {output}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=2) from exc
