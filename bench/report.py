"""Derived numbers (ceilings, ratios, the NPU projection, targets) and the markdown report."""

from __future__ import annotations

NAMES = {"host-q8": "host int8", "host-q4": "host int4", "q8": "int8", "q4": "int4",
         "fp32": "fp32"}


def _ratio(a, b):
    return a / b if a is not None and b else None


def weights_per_token(run: dict) -> int:
    """Bytes of weights one decode token reads: every decoder layer file, the post (final norm
    + lm_head) and one embedding row. The ViT is not read while decoding."""
    files = run["files"]
    return files["layers"] + files["post"] + run["embed_row_bytes"]


def npu_projection(settings: dict, npu: dict) -> dict:
    """Projected AX650N decode per token: seed NPU time + host overhead + the bytes fed, at a
    memmove+flush rate calibrated on Axera's measured full-feed decode (~217 ms/token) unless
    one is given. `npu["feed"]` (bench/npu_feed.py) has the measured rows-mode bytes."""
    seed = settings["npu_seed"]
    npu_ms = seed["decode_ms_per_layer"] * seed["layers"] + seed["post_ms"]
    host_ms = npu["overhead_ms_per_token"]
    feed = npu.get("feed")
    # the published shape's full feed (bench/npu_feed.py), else what the pipeline run was fed
    fed = feed["full"]["bytes_per_token"] if feed else npu["bytes_fed_per_token"]
    vendor = settings.get("vendor_full_ms_per_token")
    rate = settings.get("copy_rate_bytes_s") or fed / ((vendor - npu_ms - host_ms) / 1e3)
    copy_ms = 1e3 * fed / rate
    if feed:  # measured at the published shape, rows mode
        fed_new_rows = feed["rows"]["bytes_per_token"]
        rows_host_ms = feed["rows"]["host_ms_per_token"]
    else:  # the other inputs as now + one row of K and V per layer
        by_input = npu["bytes_by_input_per_token"]
        kv_full = by_input.get("K_cache", 0) + by_input.get("V_cache", 0)
        fed_new_rows = fed - kv_full + 2 * npu["layers"] * npu["kv_dim"] * 2
        rows_host_ms = host_ms
    copy_new_ms = 1e3 * fed_new_rows / rate
    return {
        "npu_ms_per_token": npu_ms,
        "npu_only_tok_s": 1e3 / npu_ms,
        "host_overhead_ms_per_token": host_ms,
        "bytes_fed_per_token": fed,
        "vendor_full_ms_per_token": vendor,
        "copy_rate_bytes_s": rate,
        "copy_rate_calibrated": not settings.get("copy_rate_bytes_s"),
        "copy_ms_per_token": copy_ms,
        "projected_tok_s": 1e3 / (npu_ms + host_ms + copy_ms),
        "bytes_fed_new_rows_only": fed_new_rows,
        "copy_ms_new_rows_only": copy_new_ms,
        "projected_new_rows_tok_s": 1e3 / (npu_ms + host_ms + copy_new_ms),
        "rows_host_ms_double": rows_host_ms,
        "projected_rows_pessimistic_tok_s": 1e3 / (npu_ms + 4 * rows_host_ms + copy_new_ms),
        "sensitivity_tok_s": {f"{r:g} GB/s": 1e3 / (npu_ms + host_ms + 1e3 * fed / (r * 1e9))
                              for r in (1.5, 3.0, 6.0, 12.0)},
        "host_x4_tok_s": 1e3 / (npu_ms + 4 * host_ms + copy_ms),
    }


def derive(settings, machine, build, bandwidth, ours, hf, npu, agreement, study,
           anchor=None) -> dict:
    prim_name = settings["primary"]
    primary = ours[prim_name]
    bw = bandwidth["read_bytes_s"]
    ceilings = {}
    for name, run in ours.items():
        w = weights_per_token(run)
        ceilings[name] = {"weight_bytes_per_token": w, "ceiling_tok_s": bw / w,
                          "decode_vs_ceiling": _ratio(run["decode_tok_s"], bw / w)}
    proj = npu_projection(settings, npu)
    hf32, hf16 = hf.get("float32", {}), hf.get("bfloat16", {})
    ref_tokens = hf32.get("tokens")
    for run in ours.values():
        if ref_tokens:
            same = sum(a == b for a, b in zip(run["tokens"], ref_tokens, strict=False))
            run["tokens_equal_hf_fp32"] = f"{same}/{len(ref_tokens)}"
    model_bytes = primary["files"]["total"]
    out = {
        "settings": settings, "machine": machine, "build": build, "bandwidth": bandwidth,
        "ours": ours, "hf": hf, "npu": npu, "agreement": agreement, "threads_study": study,
        "ceilings": ceilings, "npu_projection": proj,
        # the keys of issue 5 (ours = the primary build)
        "primary_build": prim_name,
        "decode_tok_s": primary["decode_tok_s"],
        "hf_bf16_decode_tok_s": hf16.get("decode_tok_s"),
        "hf_fp32_decode_tok_s": hf32.get("decode_tok_s"),
        "ttft_image_s": primary["ttft_image_s"],
        "hf_bf16_ttft_image_s": hf16.get("ttft_image_s"),
        "overhead_frac": primary["overhead_frac"],
        "bytes_fed_per_token": primary["bytes_fed_per_token"],
        "npu_bytes_fed_per_token": npu["bytes_fed_per_token"],
        "peak_rss_bytes": primary["peak_rss_bytes"],
        "model_bytes": model_bytes,
        "bandwidth_bytes_s": bw,
        "decode_ceiling_tok_s": ceilings[prim_name]["ceiling_tok_s"],
        "projected_ax650_tok_s": proj["projected_tok_s"],
        "projected_ax650_copy_ms": proj["copy_ms_per_token"],
        "projected_ax650_rows_tok_s": proj["projected_new_rows_tok_s"],
        "logit_cosine": agreement.get(prim_name, {}).get("cosine_mean"),
        "logit_top1_agreement": agreement.get(prim_name, {}).get("top1_agreement"),
    }
    ratios = {
        "decode_vs_hf_bf16": _ratio(out["decode_tok_s"], out["hf_bf16_decode_tok_s"]),
        "decode_vs_hf_fp32": _ratio(out["decode_tok_s"], out["hf_fp32_decode_tok_s"]),
        "ttft_image_vs_hf_bf16": _ratio(out["ttft_image_s"], out["hf_bf16_ttft_image_s"]),
        "ttft_image_vs_hf_fp32": _ratio(out["ttft_image_s"], hf32.get("ttft_image_s")),
        "decode_vs_ceiling": ceilings[prim_name]["decode_vs_ceiling"],
        "peak_rss_vs_model_bytes": _ratio(out["peak_rss_bytes"], model_bytes),
    }
    for name, run in ours.items():
        ratios[f"{name}_decode_vs_hf_bf16"] = _ratio(run["decode_tok_s"],
                                                    out["hf_bf16_decode_tok_s"])
    out["ratios"] = ratios
    out.update(ratios)
    out["targets"] = [
        _target("decode >= 1.5x transformers bf16", ratios["decode_vs_hf_bf16"], 1.5, ">="),
        _target("TTFT (1 image) <= transformers bf16", ratios["ttft_image_vs_hf_bf16"], 1.0,
                "<="),
        _target("host overhead <= 2% of session time", out["overhead_frac"], 0.02, "<="),
        _target("peak RSS <= 1.2x model files", ratios["peak_rss_vs_model_bytes"], 1.2, "<="),
        _target(f"{NAMES[prim_name]} decode >= 60% of the bandwidth ceiling",
                ratios["decode_vs_ceiling"], 0.6, ">="),
    ]
    if anchor:  # bench/llamacpp.py: the issue-15 keys
        out["anchor"] = anchor
        out.update({k: v for k, v in anchor.items() if k != "llamacpp_runs"})
        out["targets"] += [
            _target("int8 decode >= 1.0x llama.cpp Q8_0", anchor["decode_vs_llamacpp_q8"],
                    1.0, ">="),
            _target("int4 decode >= 1.0x llama.cpp Q4_0", anchor["q4_decode_vs_llamacpp_q4"],
                    1.0, ">="),
            _target("llama.cpp threads == ours", anchor["llamacpp_threads"],
                    settings["threads"], "=="),
        ]
    return out


def _target(name, value, limit, op):
    met = None if value is None else {">=": value >= limit, "<=": value <= limit,
                                      "==": value == limit}[op]
    return {"name": name, "value": value, "limit": limit, "op": op, "met": met}


# --------------------------------------------------------------------------------------------


def _num(x, digits=3):
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _bytes(x):
    if x is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.3g}%"


def markdown(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    ours, hf = r["ours"], r["hf"]
    prim = s["primary"]
    order = [prim] + [k for k in NAMES if k in ours and k != prim]
    cols = [(f"ours {NAMES[k]}", ours[k]) for k in order]
    cols += [("transformers fp32", hf.get("float32", {})),
             ("transformers bf16", hf.get("bfloat16", {}))]
    hf16 = hf.get("bfloat16", {})
    lines = [
        f"### internvl_ros bench --{s['mode']}",
        "",
        f"Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('cpus'))} cores, "
        f"{_bytes(m.get('mem_total_bytes'))} RAM; onnxruntime {m.get('onnxruntime')}, torch "
        f"{m.get('torch')}, transformers {m.get('transformers')}. {s['tokens']} new tokens "
        f"per request (eos ignored), {s['threads']} threads (ORT intra-op per session; torch).",
        "",
        "| metric | " + " | ".join(c for c, _ in cols) + f" | ours {NAMES[prim]} vs HF bf16 |",
        "|---|" + "---|" * (len(cols) + 1),
    ]

    def row(name, key, fmt=_num, speed=True, lower_is_better=False):
        vals = [c.get(key) for _, c in cols]
        rr = None
        if speed and vals[0] and hf16.get(key):
            rr = hf16[key] / vals[0] if lower_is_better else vals[0] / hf16[key]
        tail = f"{rr:.2f}x faster" if rr else ""
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in vals) + f" | {tail} |")

    row("ViT ms per tile", "vit_ms_per_tile", lower_is_better=True)
    row("prefill tokens/s (image prompt)", "prefill_tok_s")
    row("TTFT text-only (s)", "ttft_text_s", lower_is_better=True)
    row("TTFT one image (s)", "ttft_image_s", lower_is_better=True)
    row("decode tokens/s (median token)", "decode_tok_s")
    row("decode tokens/s (mean)", "decode_tok_s_mean")
    lines.append("| host overhead per decode token | " + " | ".join(
        "n/a" if c.get("overhead_ms_per_token") is None else
        f"{c['overhead_ms_per_token']:.3g} ms = {_pct(c['overhead_frac'])} of session time"
        for _, c in cols) + " | |")
    row("bytes fed per decode token", "bytes_fed_per_token", _bytes, speed=False)
    row("peak RSS", "peak_rss_bytes", _bytes, speed=False)
    files = [c["files"]["total"] if "files" in c else c.get("files_bytes") for _, c in cols]
    lines.append("| model files | " + " | ".join(_bytes(f) for f in files) + " | |")
    lines.append("| greedy tokens equal to transformers fp32 | " + " | ".join(
        c.get("tokens_equal_hf_fp32", "(reference)" if c is hf.get("float32") else "n/a")
        for _, c in cols) + " | |")
    lines.append("| other processes' CPU use while measured | " + " | ".join(
        "n/a" if not c.get("machine_load") else _pct(c["machine_load"]["others_frac"])
        for _, c in cols) + " | |")
    lines.append("")

    ratios = r["ratios"]
    lines += [f"**Ratios** (ours = {NAMES[prim]} build): " + ", ".join(
        f"{k} {v:.2f}" for k, v in ratios.items() if v is not None), ""]

    bw = r["bandwidth"]
    lines += ["**Memory-bandwidth limit** (weights read per decode token / read bandwidth)", "",
              "| build | weights read per token | ceiling tok/s | measured tok/s | of ceiling |",
              "|---|---|---|---|---|"]
    for name in order:
        c = r["ceilings"][name]
        lines.append(f"| ours {NAMES[name]} | {_bytes(c['weight_bytes_per_token'])} | "
                     f"{_num(c['ceiling_tok_s'])} | {_num(ours[name]['decode_tok_s'])} | "
                     f"{_pct(c['decode_vs_ceiling'])} |")
    lines += ["", f"Read bandwidth {_bytes(bw['read_bytes_s'])}/s (numpy, best of "
              f"{bw['repeats']} runs, method {bw['method']}); host memcpy "
              f"{_bytes(bw['memcpy_bytes_s'])}/s.", ""]

    p, npu = r["npu_projection"], r["npu"]
    sd = s["npu_seed"]
    lines += ["**AX650N decode projection** (per token)", "",
              "| term | value |", "|---|---|",
              f"| NPU time (seed: {sd['decode_ms_per_layer']} ms x {sd['layers']} layers + post "
              f"{sd['post_ms']} ms) | {p['npu_ms_per_token']:.2f} ms "
              f"({p['npu_only_tok_s']:.1f} tok/s alone) |",
              f"| host overhead, measured through the axengine double | "
              f"{p['host_overhead_ms_per_token']:.3g} ms |",
              "| bytes fed per decode token, kv_feed=full (measured through the double"
              + (", published shape" if npu.get("feed") else f", {npu['layers']} layers")
              + f") | {_bytes(p['bytes_fed_per_token'])} |",
              f"| byte-copy term at {p['copy_rate_bytes_s'] / 1e9:.2f} GB/s"
              + (f" (calibrated: Axera measured ~{p['vendor_full_ms_per_token']:g} ms/token "
                 "with this full feed)" if p["copy_rate_calibrated"] else "")
              + f" | {p['copy_ms_per_token']:.1f} ms |",
              f"| **projected decode, kv_feed=full** | **{p['projected_tok_s']:.1f} tok/s** |",
              f"| **projected decode, kv_feed=rows** "
              f"({_bytes(p['bytes_fed_new_rows_only'])}/token, measured) | "
              f"**{p['projected_new_rows_tok_s']:.1f} tok/s** |",
              f"| rows, if the board's host work were 4x the double's "
              f"{p['rows_host_ms_double']:.1f} ms | "
              f"{p['projected_rows_pessimistic_tok_s']:.1f} tok/s |",
              "| projected at other copy rates | " + ", ".join(
                  f"{k}: {v:.1f}" for k, v in p["sensitivity_tok_s"].items()) + " |",
              f"| projected if the board's host work is 4x slower than here | "
              f"{p['host_x4_tok_s']:.1f} tok/s |", ""]

    for name, a in r["agreement"].items():
        lines += [f"**{NAMES[name]} vs float32 logits** (teacher-forced along the float32 "
                  f"greedy path, {a['positions']} positions): cosine mean "
                  f"{a['cosine_mean']:.4f} (min {a['cosine_min']:.4f}), top-1 agreement "
                  f"{_pct(a['top1_agreement'])}.", ""]
    if r["threads_study"]:
        lines += [f"**Intra-op threads** (ours {NAMES[s['study_variant']]}, text prompt, "
                  f"{s['study_tokens']} tokens): " + ", ".join(
                      f"{t} thread(s) {_num(x['decode_tok_s'])} tok/s"
                      for t, x in r["threads_study"].items()), ""]
    if r.get("anchor"):
        from llamacpp import markdown_lines

        lines += markdown_lines(r["anchor"])
    lines += ["**Targets**" + (" (defined for --full; on the tiny model they are only a smoke test)"
                               if s["mode"] == "quick" else ""),
              "", "| target | value | met |", "|---|---|---|"]
    for t in r["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {_num(t['value'])} | {met} |")
    return "\n".join(lines) + "\n"
