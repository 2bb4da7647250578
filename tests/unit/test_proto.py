"""The committed generated code must match proto/loomrun.proto (run `make proto` after editing)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "loomrun" / "_proto"


def test_generated_code_is_fresh(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    status = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto" / "loomrun.proto"),
        ]
    )
    assert status == 0
    for name in ("loomrun_pb2.py", "loomrun_pb2.pyi"):
        fresh = (tmp_path / name).read_text()
        assert fresh == (GENERATED / name).read_text(), f"{name} is stale: run `make proto`"
