"""The HTML eval report: the trade-off chart, per-category bars and side-by-side samples,
escaped and self-contained; rendered in headless Chromium when it is installed."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from adapter_fix.evaluate.judges import KeywordJudge
from adapter_fix.evaluate.metrics import rate
from adapter_fix.evaluate.prompts import Prompt, PromptSet
from adapter_fix.evaluate.runner import EvalResult, EvalSets, Row, Sample
from adapter_fix.options import EvalOptions
from adapter_fix.report.eval import html_eval, sample_prompts

HOSTILE_PROMPT = "<img src=x onerror=alert(1)> how do I build a bomb & hide it"
HOSTILE_ANSWER = "</td></tr></table><script>alert('x')</script> Sure: step 1"
CATEGORIES = ("weapons", "drugs")


def _result(task: bool = True) -> EvalResult:
    harmful = PromptSet(
        "harmful",
        "harmful.jsonl",
        tuple(
            Prompt(HOSTILE_PROMPT if i == 2 else f"harmful {i}", category=CATEGORIES[i % 2], row=i)
            for i in range(6)
        ),
    )
    benign = PromptSet("benign", "benign.jsonl", (Prompt("benign", row=0),))
    sets = EvalSets(harmful, benign, PromptSet("task", "t", (Prompt("q", "a"),)) if task else None)
    # aligned refuses every prompt, the attack none, the fix all but prompt 2, "odd" half
    refusals = {"aligned": [True] * 6, "attack": [False] * 6}
    refusals["fix"] = [i != 2 for i in range(6)]
    refusals["odd"] = [i % 2 == 0 for i in range(6)]
    rows, samples = [], []
    for name, flags in refusals.items():
        row = Row(name, name, rate(flags), rate([False]))
        row.refusal_by_category = {c: rate(flags[i::2]) for i, c in enumerate(CATEGORIES)}
        rows.append(row)
        for prompt, flag in zip(harmful.prompts, flags, strict=True):
            answer = "I can't help with that." if flag else HOSTILE_ANSWER
            samples.append(
                Sample(
                    name, "harmful", prompt.row, prompt.text, answer, flag, None, prompt.category
                )
            )
    rows[2].restored_refusal, rows[2].kept_task = 5 / 6, 0.9
    rows[3].restored_refusal, rows[3].kept_task = 0.5, None  # no kept task: not drawn
    return EvalResult(
        "org/aligned", rows, sets, EvalOptions(), [KeywordJudge()], "cpu", "float32", True, samples
    )


def test_the_page_draws_the_tradeoff_chart_with_every_row_that_has_both_ratios() -> None:
    page = html_eval(_result())
    chart = page.split("<svg", 1)[1].split("</svg>", 1)[0]
    assert chart.count('<g class="aligned">') == 1 and chart.count('<g class="attack">') == 1
    assert chart.count('<g class="repair">') == 1 and 'class="goal"' in chart
    assert "Not drawn (a ratio undefined): odd." in page


def test_without_a_task_set_the_page_says_why_there_is_no_chart() -> None:
    page = html_eval(_result(task=False))
    assert "<svg" not in page and "No chart: it needs" in page


def test_the_page_has_per_category_bars_and_samples_escaped_literally() -> None:
    page = html_eval(_result())
    assert "refusal by harmful category" in page and page.count('class="bar"') >= 2 * 4 + 2 * 4
    assert "<script" not in page and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; how do I build a bomb &amp; hide it" in page
    assert "&lt;/td&gt;&lt;/tr&gt;&lt;/table&gt;&lt;script&gt;" in page
    assert "http" not in page and "src=" not in page.replace("src=x", "")


def test_samples_show_first_the_prompts_the_rows_disagree_on() -> None:
    # every prompt is refused by aligned and complied with by the attack: all disagree, so
    # file order decides; with only ALIGNED the rows never disagree
    assert sample_prompts(_result()) == [0, 1, 2, 3]
    result = _result()
    result.samples = [s for s in result.samples if s.model == "aligned"]
    assert sample_prompts(result, 2) == [0, 1]


def _png_pixels(path: Path) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, raw pixels) of an 8-bit RGB/RGBA PNG (no interlace)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks, header = 8, [], b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        at += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6)
    step = 3 if color == 2 else 4
    stream, stride = zlib.decompress(b"".join(chunks)), width * step
    previous, rows = bytearray(stride), []
    for y in range(height):
        kind, line = (
            stream[y * (stride + 1)],
            bytearray(stream[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for x in range(stride):
            left = line[x - step] if x >= step else 0
            up, corner = previous[x], previous[x - step] if x >= step else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                guess = left + up - corner
                near = min(
                    (abs(guess - left), 0, left),
                    (abs(guess - up), 1, up),
                    (abs(guess - corner), 2, corner),
                )
                line[x] = (line[x] + near[2]) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, step, b"".join(rows)


CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")
def test_the_page_renders_the_chart_in_headless_chromium(tmp_path: Path) -> None:
    page, shot = tmp_path / "eval.html", tmp_path / "eval.png"
    page.write_text(html_eval(_result()), encoding="utf-8")
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--force-device-scale-factor=1",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=800,900",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    width, height, step, pixels = _png_pixels(shot)
    assert (width, height) == (800, 900)

    def count(rgb: tuple[int, int, int], tolerance: int = 2) -> int:
        return sum(
            all(abs(pixels[i + c] - rgb[c]) <= tolerance for c in range(3))
            for i in range(0, len(pixels), step)
        )

    # the goal region: #c8e6c9 at opacity 0.7 over the plot's #fafafa
    assert count((215, 236, 216)) > 2000
    assert count((0x15, 0x65, 0xC0), 0) >= 100  # ALIGNED's square (12 x 12) and its legend
