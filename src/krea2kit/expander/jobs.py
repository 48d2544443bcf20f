"""The expansion step of a run, before the text encoder:

1. the prompts to expand (``[expander] enabled``, or a ``[[prompts]]`` entry's ``expand``)
   pass the prompt filters as written: a blocked prompt is never sent to a model;
2. each distinct prompt is expanded once: an answer recorded in the image being re-run
   (``krea2kit run IMAGE.png``), else one in the cache, else the backend is asked (and the
   answer cached); LoRA trigger words the model dropped are appended again;
3. the job's ``prompt`` becomes the expanded text, which the pipeline then filters like any
   prompt (so an expansion that adds what a filter blocks is blocked).

A failure of the model is an :class:`ExpanderError` (exit 5), or with ``on_failure =
"original"`` a warning and the prompt as written. Weights that cannot generate are a
``WeightsError`` (exit 4) either way: that is a setup to fix, not an answer that failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from krea2kit.errors import ExpanderError, Krea2kitError
from krea2kit.recipe.expander import active, section, wanted
from krea2kit.recipe.schema import ExpanderSection

__all__ = ["active", "expand_jobs", "metadata_entry", "record_fields", "section", "wanted"]


def _recorded(plan: Any) -> list[dict[str, Any]]:
    """Expansions recorded in the image a recipe was read from (``run IMAGE.png``)."""
    loaded = plan.loaded
    if not getattr(loaded, "from_image", False):
        return []
    from krea2kit.output.metadata import read_image_metadata

    try:
        record = read_image_metadata(loaded.path).get("krea2kit")
    except Exception:  # noqa: BLE001 - already read once by the loader; unreadable now: ask again
        return []
    entry = record.get("expander") if isinstance(record, dict) else None
    return [entry] if isinstance(entry, dict) else []


def _match(recorded: list[dict[str, Any]], ex: ExpanderSection, text: str) -> str | None:
    for r in recorded:
        if (r.get("original") == text and r.get("backend") == ex.backend and r.get("seed") == ex.seed
                and r.get("temperature") == ex.temperature and r.get("max_tokens") == ex.max_tokens
                and isinstance(r.get("expanded"), str) and r["expanded"].strip()):
            return r["expanded"]
    return None


def _triggers(recipe: Any) -> list[str]:
    return [lora.trigger for lora in recipe.loras if lora.trigger]


def _with_triggers(text: str, triggers: list[str]) -> str:
    for trig in triggers:  # as planning appends them: a LoRA's trigger must reach the encoder
        if trig not in text:
            text = f"{text}, {trig}"
    return text


def expand_jobs(plan: Any, settings: Any, filters: Any, *, load_backend: Callable[[], Any],
                events: Callable[..., None]) -> dict[int, Any]:
    """Expand the prompts of ``plan``'s jobs in place (``job.prompt``, ``job.expansion``).

    ``load_backend()`` returns the ``[expander] backend`` part (called at most once, and not at
    all when the image being re-run records every answer; its ``identity`` keys the cache, so
    ``load`` must be cheap and weights wait for the first ``expand``). Returns ``{job index: blocking decision}`` for
    jobs whose prompt was blocked as written (those are not expanded).
    """
    from krea2kit.expander.cache import FOLDER, ExpansionCache, cache_key
    from krea2kit.expander.system_prompt import load_system_prompt

    targets = [job for job in plan.jobs if wanted(plan.recipe, job.prompt_index)]
    if not targets:
        return {}
    ex = section(plan.recipe)
    system = load_system_prompt(ex.system_prompt, file=plan.loaded.file_of("expander.system_prompt"))
    for job in targets:  # a plan run twice expands the original again, not its expansion
        if job.expansion is not None:
            job.prompt = job.expansion["original"]
            job.expansion = None
    blocked = filters.check_prompts(targets)  # 1. as written: a blocked prompt is never sent anywhere
    recorded = _recorded(plan)
    use_cache = ex.cache == "use"
    cache = ExpansionCache(settings.cache_root() / FOLDER) if settings.cache.prompt_expansions else None
    triggers = _triggers(plan.recipe)
    backend: Any = None
    backend_failed: ExpanderError | None = None
    done: dict[str, dict[str, Any]] = {}

    def fail(exc: ExpanderError, text: str) -> dict[str, Any]:
        if ex.on_failure != "original":
            raise exc
        events("warning", message=f"{exc.message}; keeping the prompt as written (expander.on_failure = "
                                  f"\"original\"): {text[:80]!r}")
        return {"expanded": None, "identity": getattr(backend, "identity", None), "source": "original",
                "error": exc.message}

    for job in targets:
        text = job.prompt
        if job.index in blocked or text in done:
            continue
        about = {"backend": ex.backend, "system_prompt": system.name, "system_prompt_sha256": system.sha256,
                 "seed": ex.seed, "temperature": ex.temperature, "max_tokens": ex.max_tokens}
        found = _match(recorded, ex, text) if use_cache else None
        if found is not None:
            done[text] = {"expanded": found, "identity": None, "source": "image"}
            continue
        if backend is None and backend_failed is None:
            try:
                backend = load_backend()
            except ExpanderError as exc:
                backend_failed = exc
        if backend_failed is not None:
            done[text] = fail(backend_failed, text)
            continue
        key = cache_key(backend=ex.backend, identity=backend.identity, system_prompt_sha256=system.sha256,
                        prompt=text, seed=ex.seed, temperature=ex.temperature, max_tokens=ex.max_tokens)
        hit = cache.get(key) if cache is not None and use_cache else None
        if hit is not None:
            done[text] = {"expanded": hit, "identity": backend.identity, "source": "cache"}
            continue
        try:
            answer = backend.expand(text, system_prompt=system.text, seed=ex.seed, temperature=ex.temperature,
                                    max_tokens=ex.max_tokens)
            if not isinstance(answer, str) or not answer.strip():
                raise ExpanderError(f"prompt expander {ex.backend!r} gave an empty answer", key="expander",
                                    hint="try another model or a larger expander.max_tokens")
        except ExpanderError as exc:
            done[text] = fail(exc, text)
            continue
        except Krea2kitError:
            raise
        except Exception as exc:  # a plugin backend's own error: the same failure, named
            done[text] = fail(ExpanderError(f"prompt expander {ex.backend!r} failed: {type(exc).__name__}: {exc}",
                                            key="expander.backend"), text)
            continue
        answer = answer.strip()
        if cache is not None:
            cache.put(key, answer, about={**about, "identity": backend.identity, "prompt": text})
        done[text] = {"expanded": answer, "identity": backend.identity, "source": "model"}
    shown: set[str] = set()
    for job in targets:
        if job.index in blocked:
            continue
        result = done[job.prompt]
        original = job.prompt
        expanded = _with_triggers(result["expanded"], triggers) if result["expanded"] else None
        job.expansion = {"original": original, "expanded": expanded, **{k: v for k, v in result.items()
                                                                          if k != "expanded"},
                         "backend": ex.backend, "system_prompt": system.name,
                         "system_prompt_sha256": system.sha256, "seed": ex.seed, "temperature": ex.temperature,
                         "max_tokens": ex.max_tokens}
        if expanded is not None:
            job.prompt = expanded
            if original not in shown:
                shown.add(original)
                events("expanded", job=job, original=original, expanded=expanded, source=result["source"])
    return blocked


def metadata_entry(job: Any, *, include_prompt: bool) -> dict[str, Any]:
    """``{"expander": {...}}`` for an image's krea2kit record (both texts unless the recipe
    keeps prompts private), ``{}`` for a prompt that was not expanded."""
    if job.expansion is None:
        return {}
    entry = {k: v for k, v in job.expansion.items() if v is not None or k == "expanded"}
    if not include_prompt:
        entry.pop("original", None)
        entry.pop("expanded", None)
        entry.pop("error", None)
    return {"expander": entry}


def record_fields(job: Any, *, include_prompt: bool) -> dict[str, Any]:
    """The JSON output fields of an expanded job: the original prompt and how it was expanded."""
    if job.expansion is None:
        return {}
    how = {k: job.expansion.get(k) for k in ("backend", "identity", "source", "system_prompt", "seed",
                                              "temperature", "max_tokens")}
    return {"original_prompt": job.expansion["original"] if include_prompt else None, "expansion": how}

