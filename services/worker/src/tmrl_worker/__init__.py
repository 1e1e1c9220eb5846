"""tmrl worker service."""

__version__ = "0.1.0"


def main() -> None:
    """The ``tmrl-worker`` command: its CLI (imported here, with stop signals held until it is) runs."""
    from tmrl_common.stop_signals import run_command_line

    def load_app():  # noqa: ANN202 - the typer app
        from tmrl_worker.cli import app

        return app

    run_command_line("tmrl-worker", load_app)
