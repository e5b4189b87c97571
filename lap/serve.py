"""Ray Serve applications, named by `serve_config.yaml` (`serve deploy serve_config.yaml`).

Each builder takes the `args` of its application in the config. Replicas read
their settings from `LAP_` environment variables and the `LAP_CONFIG` file,
the same way the `lap` command does.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from lap.ingest.app import IngestAPI
from lap.output.app import OutputAPI
from lap.process.pipeline import Pipeline
from lap.web.console_app import Console


def build_ingest(args: dict[str, Any] | None = None) -> Application:
    return IngestAPI.bind()


def build_output(args: dict[str, Any] | None = None) -> Application:
    return OutputAPI.bind()


def build_pipeline(args: dict[str, Any] | None = None) -> Application:
    return Pipeline.bind()


def build_console(args: dict[str, Any] | None = None) -> Application:
    return Console.bind()
