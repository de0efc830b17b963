"""notebooks/evaluate.ipynb runs top to bottom against a tiny artifact and shows the accuracy table."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from eval_support import REPO, make_artifact

NOTEBOOK = REPO / "notebooks" / "evaluate.ipynb"


def outputs_text(cell) -> str:
    texts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stdout":  # warnings go to stderr
            texts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            texts.append(out["data"]["text/plain"])
    return "".join(texts)


def test_the_shipped_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert "parameters" in nb.cells[1].metadata.get("tags", [])


@pytest.mark.slow
def test_notebook_executes_and_shows_the_accuracy_table(tmp_path, monkeypatch):
    make_artifact(tmp_path, "sft", sequence_len=512)
    # the kernel inherits the environment: the parameters cell reads these
    for name, value in {"LLM_HOME": str(tmp_path), "LLM_NOTEBOOK_ARTIFACT": "sft",
                        "LLM_NOTEBOOK_TASKS": "arc_easy,mmlu,gsm8k", "LLM_NOTEBOOK_MAX_PER_TASK": "3",
                        "LLM_NOTEBOOK_MAX_TOKENS": "12", "LLM_NOTEBOOK_HUB_SOURCE": "fixture"}.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any cell error

    texts = [outputs_text(c) for c in nb.cells if c.cell_type == "code"]
    table = next((t for t in texts if "ChatCORE" in t), None)
    assert table is not None, texts
    header = table.splitlines()[0].split()
    assert header[:4] == ["kind", "n", "accuracy", "centered"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if line.strip() and "ChatCORE" not in line}
    assert set(rows) == {"arc_easy", "mmlu", "gsm8k"}
    assert rows["arc_easy"][1:3] == ["categorical", "3"] and rows["gsm8k"][1:3] == ["generative", "3"]
    assert all(0.0 <= float(r[3]) <= 1.0 for r in rows.values())
    assert any("ASSISTANT:" in t and "REFERENCE:" in t for t in texts)  # the sample conversation
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the per-task accuracy plot
