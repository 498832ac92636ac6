"""The browser page of `phitune serve`: base and each adapter answering side by side, and the run's curves.

The page is static files in this package (index.html, app.js, style.css; no build step, nothing fetched
from elsewhere). It talks to the server's own OpenAI routes for answers and to the /phitune/* routes
added here for what those cannot tell: each model's training record, the exact prompt text a model
receives, and the metrics of the runs the adapters came from. With --api-key every /phitune/* route needs
the key, like /v1/*; the page itself loads without it and asks for the key when a call is refused.
"""

import json
from pathlib import Path

STATIC = Path(__file__).parent / "static"


def run_dirs_of(loaded: object, extra: tuple | list = ()) -> dict:
    """name -> run directory: each adapter's run (the parent of final_adapter/ or of the adapter dir, when it
    holds metrics.jsonl), then each directory given with --run_dir under its own name."""
    runs = {}
    for name, path in loaded.adapters.items():
        p = Path(path).resolve()
        for cand in (p, p.parent):
            if (cand / "metrics.jsonl").is_file():
                runs[name] = cand
                break
    for d in extra:
        p = Path(d).resolve()
        if p in runs.values():
            continue
        name, i = p.name, 2
        while name in runs:
            name, i = f"{p.name}-{i}", i + 1
        runs[name] = p
    return runs


def model_info(loaded: object) -> dict:
    """What the page shows above each column: base model name; per adapter its base, rank and training."""
    out = {"base_model": loaded.base_name, "models": [{"name": "base", "kind": "base", "base_model": loaded.base_name,
                                                         "template": _template_facts(loaded.template_for(None))}]}
    for name, path in loaded.adapters.items():
        meta = loaded.metas.get(name) or {}
        training = meta.get("training") or {}
        rank = training.get("lora_r")
        if rank is None:
            cfg = Path(path) / "adapter_config.json"
            if cfg.is_file():
                rank = json.loads(cfg.read_text()).get("r")
        metrics = meta.get("metrics") or {}
        data = meta.get("data") or {}
        out["models"].append({
            "name": name, "kind": "adapter", "path": str(path),
            "base_model": (meta.get("base") or {}).get("model") or loaded.base_name,
            "rank": rank, "alpha": training.get("lora_alpha"),
            "trainable_parameters": (meta.get("lora") or {}).get("trainable_parameters"),
            "train_examples": data.get("train_examples"), "dataset": training.get("dataset_path"),
            "steps": metrics.get("steps"), "epochs": metrics.get("epochs"),
            "train_loss": metrics.get("train_loss"), "best_val_loss": metrics.get("best_val_loss"),
            "selected": meta.get("selected"), "learning_rate": training.get("learning_rate"),
            "template": _template_facts(loaded.template_for(name)),
        })
    return out


def _template_facts(template) -> dict:
    return {"kind": template.kind, "stop_tokens": template.stop_tokens, "system_prompt": template.system_prompt}


def read_run(path: Path) -> dict:
    """metrics.jsonl rows, the run's settings and summary (from final_adapter/phitune.json when it exists)."""
    rows, bad = [], 0
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a run still writing its last line
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
    meta_file = path / "final_adapter" / "phitune.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    summary = dict(meta.get("metrics") or {})
    if meta.get("selected"):
        summary["selected"] = meta["selected"]
    for key in ("train_examples", "val_examples", "truncated", "dropped"):
        if key in (meta.get("data") or {}):
            summary[key] = meta["data"][key]
    if not summary and rows:  # a run in progress: what the log says so far
        last = rows[-1]
        summary = {"steps": last.get("step"), "epochs": last.get("epoch"), "finished": False}
        for key in ("accuracy", "margin"):  # preference tuning: the latest training figures
            latest = next((r[key] for r in reversed(rows) if key in r), None)
            if latest is not None:
                summary[key] = latest
    return {"dir": str(path), "rows": rows, "unreadable_lines": bad, "settings": meta.get("training") or {},
            "summary": summary, "finished": bool(meta)}


def mount(app: object, loaded: object, routes: object, run_dirs: tuple | list = (),
          max_tokens_limit: int | None = None) -> None:
    """Add the page (GET /, /static/*) and its routes (/phitune/info, /render, /runs) to the FastAPI `app`.

    `routes` (routes.OpenAIRoutes) checks the key, reads bodies within the server's limit and tokenises off
    the event loop, for these routes as for the OpenAI ones."""
    from fastapi import Request
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    from phitune.serving import schemas as api

    check_key = routes.check_key
    runs = run_dirs_of(loaded, run_dirs)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/phitune/info")
    async def info(request: Request):
        check_key(request)
        return {**model_info(loaded), "max_tokens_limit": max_tokens_limit, "runs": list(runs)}

    @app.post("/phitune/render")
    async def render(request: Request):
        req = api.validate(api.RenderRequest, await routes.read_json(request))
        if req.model != "base" and req.model not in loaded.adapters:
            raise api.ApiError(404, f"The model '{req.model}' does not exist", code="model_not_found", param="model")
        if not req.messages:
            raise api.ApiError(400, "messages: give at least one message", code="invalid_value", param="messages")
        template = loaded.template_for(req.model)
        messages = [m.model_dump() for m in req.messages]
        text, ids = await routes.off_loop(lambda: (template.render_prompt(messages), template.encode_prompt(messages)))
        return {"model": req.model, "prompt": text, "tokens": len(ids), "stop_tokens": template.stop_tokens}

    @app.get("/phitune/runs")
    async def list_runs(request: Request):
        check_key(request)
        return {"runs": [{"name": name, "dir": str(path), "adapter": name in loaded.adapters}
                         for name, path in runs.items()]}

    @app.get("/phitune/runs/{name}")
    async def one_run(name: str, request: Request):
        check_key(request)
        if name not in runs:
            raise api.ApiError(404, f"no run named '{name}'; known: {', '.join(runs) or 'none'}")
        return {"name": name, **read_run(runs[name])}
