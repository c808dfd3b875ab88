"""The docs stay true: generated tables match their results files, links resolve, the README opens with the
two commands a newcomer runs.

`docs/generate.py` writes every figure of docs/models.md and docs/benchmarks.md from
models/*/eval_results.json and bench/results/*.json; a table edited by hand, or a results file rebuilt without
`make docs`, fails here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "docs" / "generate.py"
DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def generate(*args: str) -> subprocess.CompletedProcess:
    # -I -S: no site-packages, so the generator provably needs nothing outside the standard library.
    return subprocess.run([sys.executable, "-I", "-S", str(GENERATE), *args], capture_output=True, text=True,
                          timeout=120)


def test_generated_docs_match_their_results_files():
    result = generate("--check")
    assert result.returncode == 0, f"run `make docs`:\n{result.stderr[-6000:]}"


def test_the_docs_have_generated_regions_for_both_models_and_the_benches():
    models = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    bench = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for name in ("models-overview", "models-category", "models-pii"):
        assert f"<!-- generated:{name}:start -->" in models
    for name in ("bench-summary", "bench-envoy", "bench-inference", "bench-naive", "bench-long-prompts"):
        assert f"<!-- generated:{name}:start -->" in bench


def _doc_root(tmp_path: Path, category: dict, pii: dict | None) -> Path:
    (tmp_path / "models" / "category").mkdir(parents=True)
    (tmp_path / "models" / "category" / "eval_results.json").write_text(json.dumps(category))
    if pii is not None:
        (tmp_path / "models" / "pii").mkdir(parents=True)
        (tmp_path / "models" / "pii" / "eval_results.json").write_text(json.dumps(pii))
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    regions = ["models-overview", "models-targets", "models-category", "models-pii", "bench-summary", "bench-envoy",
               "bench-long-prompts", "bench-multitask", "bench-envoy-rerun"]
    (tmp_path / "docs" / "page.md").write_text(
        "# page\n\n" + "".join(f"<!-- generated:{n}:start -->\n<!-- generated:{n}:end -->\n\n" for n in regions))
    return tmp_path


def test_a_rebuilt_report_of_another_shape_is_rendered_not_guessed(tmp_path):
    """The model reports change keys with the recipe: whatever numbers they hold are shown, missing
    sections and files are skipped, and nothing crashes."""
    category = {
        "task": "category",
        "labels": ["law", "math"],
        "served": {"exam": {"rows": 1200, "accuracy": 0.8123,
                            "per_class": {"law": {"f1": 0.8811, "support": 88}},
                            "coverage": [{"threshold": 0.5, "coverage": 0.9554}],
                            "confusion_matrix": {"labels": ["law", "math"], "matrix": [[1, 2], [3, 4]]}},
                   "everyday": {"rows": 300, "accuracy": 0.6551}},
        "baseline": {"model": "TF-IDF + linear SVM", "exam": {"rows": 1200, "accuracy": 0.7912}},
        "everyday_accuracy_by_runtime": {"onnx-int8": {"accuracy": 0.6549}},
        "notes": ["Level with the baseline."],
    }
    pii = {"catch_rate": {"served": {"wnut_validation": {"entities": 512, "caught": 0.9312,
                                                          "per_type": {"PERSON": {"entities": 400, "caught": 0.94}}}}}}
    root = _doc_root(tmp_path, category, pii)
    result = generate("--root", str(root))
    assert result.returncode == 0, result.stderr
    page = (root / "docs" / "page.md").read_text()
    for expected in ("exam / accuracy", "0.8123", "everyday / rows", "0.6551", "TF-IDF + linear SVM", "0.7912",
                     "Everyday accuracy by runtime", "0.6549", "Level with the baseline.", "wnut validation",
                     "0.9312", "PERSON", "0.9400", "run `make bench`"):
        assert expected in page, expected
    assert "Not generated" not in page and "confusion" not in page  # matrices are the model cards' to draw
    for expected in ("exam / per class", "0.8811", "exam / coverage", "0.9554"):
        assert expected in page, expected
    assert generate("--root", str(root), "--check").returncode == 0


def test_the_readme_table_puts_each_held_out_figure_beside_its_baseline_and_skips_what_a_report_lacks(tmp_path):
    category = {"served": {"exam": {"accuracy": 0.8123}, "everyday": {"accuracy": 0.6551}},
                "baseline": {"exam": {"accuracy": 0.7912}}}
    pii = {"served": {"presidio_held_out_templates": {"caught": 0.9434}},
           "baseline_recognizers_only": {"presidio_held_out_templates": {"caught": 0.0814}}}
    root = _doc_root(tmp_path, category, pii)
    assert generate("--root", str(root)).returncode == 0
    page = (root / "docs" / "page.md").read_text()
    assert "| category: exam questions | 81.2% | TF-IDF + SVM 79.1% | baseline + 2 points |" in page
    assert "| category: everyday questions (never trained on) | 65.5% | - | 85% and baseline + 10 points |" in page
    assert "| PII caught: Presidio text, unseen templates | 94.3% | recognizers alone 8.1% | 97% |" in page
    assert "any position" not in page and "WNUT-17" not in page


def test_an_ensembles_overview_describes_each_member_and_its_own_labels(tmp_path):
    def member(layers: int, epochs: int) -> dict:
        return {"path": f"build/models/pii-{layers}", "weight": 0.5,
                "config": {"num_hidden_layers": layers, "hidden_size": 256},
                "results": {"settings": {"epochs": epochs, "batch_size": 16},
                            "base_model": f"build/models/encoder-{layers}"}}

    pii = {"task": "pii", "labels": ["O", "B-PERSON", "I-PERSON"], "created": "2026-12-05",
           "ensemble": {"members": [member(4, 5), member(6, 3)], "entity_bias": {"PERSON": 0.5}}}
    root = _doc_root(tmp_path, {"task": "category", "labels": ["law"]}, pii)
    assert generate("--root", str(root)).returncode == 0
    page = (root / "docs" / "page.md").read_text()
    assert "2 members, logits averaged (`trainer ensemble`): `build/models/pii-4`, `build/models/pii-6`" in page
    assert "| layers, hidden size | - | 4, 256 + 6, 256 |" in page
    assert "| epochs | - | 5 + 3 |" in page
    assert "| batch size | - | 16 |" in page  # the members agree: said once
    assert "| output labels | 1 | 3 |" in page  # the ensemble's own
    assert "| `build/models/pii-6` | 0.5000 | 6, 256 | build/models/encoder-6 |" in page
    assert "Added to the mean's logits inside the graph: PERSON +0.5." in page
    assert generate("--root", str(root), "--check").returncode == 0


def test_a_missing_model_report_says_so(tmp_path):
    root = _doc_root(tmp_path, {"task": "category"}, None)
    result = generate("--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "No `models/pii/eval_results.json`" in (root / "docs" / "page.md").read_text()


def test_a_hand_edited_table_is_caught(tmp_path):
    root = _doc_root(tmp_path, {"metrics": {"accuracy": 0.5}}, None)
    assert generate("--root", str(root)).returncode == 0
    page = root / "docs" / "page.md"
    page.write_text(page.read_text().replace("0.5000", "0.9000"))
    result = generate("--root", str(root), "--check")
    assert result.returncode == 1 and "make docs" in result.stderr


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: formatting dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def _prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for line in _prose_lines(doc):
        line = re.sub(r"(?<![\[(])`[^`]*`(?![\])])", "", line)  # inline code outside link text is not a link
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_opens_with_the_two_commands_and_make_has_them():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# semantic-sidecar"
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]
    assert lines.index("```bash") < 4
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "docs", "models", "bench"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 170
