"""``report.html``: built from a run's tables alone, self-contained, small; and explored in a
real headless browser (Debian's Chromium): it loads offline, shows its views, and hovering a
suffix token shows that token's values. CI installs Chromium and sets
SUFFIX_ANALYSIS_REQUIRE_BROWSER=1, so there the browser test cannot skip."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from suffix_analysis.figures.report_html import report_data, write_report_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def fake_run(folder: Path, stages=("evaluation", "attribution")) -> Path:
    """A run folder with the tables the report reads (made up, as the figures' tests do)."""
    (folder / "run.json").write_text(json.dumps({"kind": "reproduce", "model": "tiny", "eval": {}}))
    if "evaluation" in stages:
        (folder / "evaluation").mkdir()
        pd.DataFrame([{"condition": "baseline", "intervention": "baseline", "harmful_refusal_rate": 0.9,
                       "harmful_complied_rate": 0.05, "harmful_derailed_rate": 0.05},
                      {"condition": "ablation", "intervention": "ablation", "harmful_refusal_rate": 0.1,
                       "harmful_complied_rate": 0.8, "harmful_derailed_rate": 0.1}]).to_csv(
            folder / "evaluation" / "evaluation.csv", index=False)
        (folder / "evaluation" / "completions_ablation_harmful.json").write_text(json.dumps(
            [{"instruction": "Do a bad thing.", "completion": "Sure, step one", "refused": False}]))
    if "attribution" in stages:
        a = folder / "attribution"
        a.mkdir()
        tokens = ["x", " decor", "ator", "!!"]
        pd.DataFrame([{"prompt": p, "suffix_index": i, "position": 10 + i, "token_id": i, "token": t,
                       "hook": "blocks.3.hook_resid_pre", "readout": 1.0, "effect_replace": 0.1 * i + p,
                       "effect_block": -0.25 * i, "grad_x_input": 0.01} for p in (0, 1)
                      for i, t in enumerate(tokens)]).to_csv(a / "suffix_tokens.csv", index=False)
        pd.DataFrame([{"prompt": 0, "suffix_index": i, "token": t, "layer": 2, "head": 1,
                       "hook": "blocks.2.attn.hook_pattern", "attention": 0.125 * (i + 1)}
                      for i, t in enumerate(tokens)]).to_csv(a / "suffix_attention.csv", index=False)
        pd.DataFrame([{"condition": c, "prompt": 0, "component": "head", "layer": l, "head": h, "position": -1,
                       "hook": f"blocks.{l}.attn.hook_z", "projection": 0.5 * l - h + (c == "adversarial")}
                      for c in ("harmful", "adversarial") for l in range(3) for h in range(2)]).to_csv(
            a / "heads.csv", index=False)
        pd.DataFrame([{"condition": c, "prompt": 0, "site": "hook_resid_pre", "layer": l, "position": -1,
                       "hook": f"blocks.{l}.hook_resid_pre", "cosine": 0.1 * l * (1 if c == "harmful" else -1)}
                      for c in ("harmful", "adversarial") for l in range(4)]).to_csv(a / "cosine.csv", index=False)
    return folder


def test_report_data_reads_the_tables(tmp_path):
    d = report_data(fake_run(tmp_path))
    tok = d["views"]["tokens"]
    assert [t["token"] for t in tok["tokens"]] == ["x", " decor", "ator", "!!"]
    assert tok["tokens"][1]["effect_replace"] == pytest.approx(0.6)  # mean over the two prompts
    assert tok["tokens"][3]["attention"] == {"L2H1": 0.5} and tok["heads"] == ["L2H1"]
    assert d["views"]["heads"]["conditions"]["adversarial"][2] == [2.0, 1.0]
    assert d["views"]["cosine"]["conditions"]["harmful"][3] == [3, pytest.approx(0.3)]
    assert d["views"]["rates"]["bars"][1]["examples"][0]["completion"] == "Sure, step one"
    assert d["missing"] == []


def test_a_run_missing_stages_names_them_and_keeps_the_rest(tmp_path):
    path = write_report_html(fake_run(tmp_path, stages=("evaluation",)))
    page = path.read_text()
    d = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))
    assert d["missing"] == ["attribution"] and d["views"]["rates"] is not None and d["views"]["tokens"] is None


def test_the_page_is_self_contained_and_small(tmp_path):
    path = write_report_html(fake_run(tmp_path))
    page = path.read_text()
    assert path.stat().st_size < 5_000_000
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    assert "</script>" not in page.split('id="report-data">')[1].split("</script>")[0]  # data cannot close the tag


@pytest.mark.slow
def test_the_report_in_a_real_browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("SUFFIX_ANALYSIS_REQUIRE_BROWSER"):
            pytest.fail("Chromium and ChromeDriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("no Chromium/ChromeDriver (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path = write_report_html(fake_run(tmp_path))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(path.as_uri())
        assert driver.find_element(By.ID, "title").text == "suffix-analysis: tiny"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#tokens .token")) == 4
        assert len(driver.find_elements(By.CSS_SELECTOR, "#heads-heatmap td.cell")) == 6
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cosine-chart .point")) == 8
        assert len(driver.find_elements(By.CSS_SELECTOR, "#rates-chart .bar")) == 6
        token = driver.find_element(By.CSS_SELECTOR, '#tokens .token[data-index="3"]')
        ActionChains(driver).move_to_element(token).perform()
        shown = driver.find_element(By.ID, "token-readout").text
        assert 'token 3: "!!"' in shown and "effect_block -0.7500" in shown and "L2H1 0.5000" in shown
        cell = driver.find_element(By.CSS_SELECTOR, '#heads-heatmap td[data-layer="2"][data-head="0"]')
        ActionChains(driver).move_to_element(cell).perform()
        assert driver.find_element(By.ID, "heads-readout").text == "adversarial: layer 2, head 0: 2.0000"
        bar = driver.find_element(By.CSS_SELECTOR, '#rates-chart .bar[data-bar="1"][data-kind="complied"]')
        ActionChains(driver).move_to_element(bar).perform()
        assert "Sure, step one" in driver.find_element(By.ID, "rates-readout").text
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # no script errors
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()
