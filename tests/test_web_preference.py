"""The Runs tab of the page for a preference-tuning run: rewards of chosen and rejected, margin, accuracy."""
import json

import pytest

from test_web import browser, open_page, start_server, stop_server  # noqa: F401  (browser is a fixture)


def _dpo_metrics(run):
    """metrics.jsonl as a DPO run writes it: per step loss, rewards, margin and accuracy; validation every 5."""
    run.mkdir()
    rows = []
    for step in range(1, 13):
        rows.append({"step": step, "epoch": step / 12, "loss": 0.69 - 0.03 * step, "lr": 1e-4,
                     "rewards/chosen": 0.02 * step, "rewards/rejected": -0.03 * step, "margin": 0.05 * step,
                     "accuracy": min(1.0, 0.5 + 0.05 * step)})
        if step % 5 == 0:
            rows.append({"step": step, "epoch": step / 12, "val_loss": 0.6, "val_rewards/chosen": 0.1,
                         "val_rewards/rejected": -0.1, "val_margin": 0.2, "val_accuracy": 0.75})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def dpo_server(memorised_adapter, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dpo"
    _dpo_metrics(run)
    url, proc = start_server("--adapter_path", f"tuned={memorised_adapter}", "--run_dir", run, "--precision", "fp32")
    yield url
    stop_server(proc)


def _coloured(page, canvas, rgb):
    """Pixels of about colour rgb on a canvas: the series is really drawn."""
    return page.evaluate("""([sel, c]) => { const el = document.querySelector(sel);
        const d = el.getContext('2d').getImageData(0, 0, el.width, el.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4)
          if (Math.abs(d[i] - c[0]) < 40 && Math.abs(d[i + 1] - c[1]) < 40 && Math.abs(d[i + 2] - c[2]) < 40) n++;
        return n; }""", [canvas, rgb])


def test_runs_tab_shows_dpo_rewards_margin_and_accuracy(dpo_server, browser):  # noqa: F811
    page = open_page(browser, dpo_server)
    page.click(".tab[data-tab=runs]")
    page.wait_for_selector("#runs-tab[data-loaded=tuned]")
    assert page.locator("#pref-charts").is_hidden()  # a supervised run has no preference metrics
    page.select_option("#run-select", "dpo")
    page.wait_for_selector("#runs-tab[data-loaded=dpo]")
    assert page.locator("#pref-charts").is_visible()
    rewards, accuracy = page.locator("#reward-chart"), page.locator("#accuracy-chart")
    for series in ("chosen", "rejected", "margin"):
        assert rewards.get_attribute(f"data-{series}-points") == "12"
    assert rewards.get_attribute("data-val-margin-points") == "2"
    assert accuracy.get_attribute("data-train-points") == "12" and accuracy.get_attribute("data-val-points") == "2"
    assert _coloured(page, "#reward-chart", (5, 150, 105)) > 100  # chosen, green
    assert _coloured(page, "#reward-chart", (220, 38, 38)) > 100  # rejected, red
    assert _coloured(page, "#accuracy-chart", (37, 99, 235)) > 100
    # the loss chart still shows the DPO loss; the summary of a run in progress has the last accuracy and margin
    assert page.locator("#loss-chart").get_attribute("data-train-points") == "12"
    summary = page.locator("#run-summary").text_content().replace(" ", "")
    assert "accuracy1" in summary and "margin0.6" in summary
    page.select_option("#run-select", "tuned")
    page.wait_for_selector("#runs-tab[data-loaded=tuned]")
    assert page.locator("#pref-charts").is_hidden()
    assert not page.errors
    page.close()
