"""Describe a LoRA adapter directory: base model, trainable parameters, ranks by bits.

    python -m mlx_lm_optiq.lora.info ADAPTER_DIR [--json]

Works on adapters trained with `--optiq-rank-scaling` (reads optiq_lora_config.json)
and on stock mlx-lm adapters (constant rank read from the tensors; bits unknown). A record
that disagrees with the tensors it describes (or a stock config that cannot load them) is an
error that says what disagrees: exit status 1, no summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_lm_optiq.core.errors import user_errors
from mlx_lm_optiq.lora import adapter_files


def summarize(adapter_path: str | Path) -> dict:
    """{"base_model", "fine_tune_type", "rank_scaling", "base_rank", "padded_rank",
    "trainable_params", "budget_params", "num_modules", "by_bits": [{"bits", "modules",
    "rank_min", "rank_mean", "rank_max", "params"}]}; with a record also "init", and where it has
    residuals "residual_energy" (summed ||W - Q||^2) and "residual_captured" (energy-weighted share
    the ranks can remove)."""
    adapter_path = Path(adapter_path)
    if adapter_files.has_record(adapter_path):
        adapter_files.check_adapter_dir(adapter_path)  # the summary below must describe the real tensors
        record = adapter_files.read_record(adapter_path)
        modules = record["modules"]
        info = {
            k: record.get(k)
            for k in ("base_model", "fine_tune_type", "rank_scaling", "base_rank", "padded_rank", "budget_params")
        }
        info["init"] = record.get("init", "zero")
        energies = [(m["residual_energy"], m["residual_captured"]) for m in modules.values() if "residual_energy" in m]
        if energies:  # by_residual / loftq runs: how much of the quantization residual the ranks can remove
            total = sum(e for e, _ in energies)
            info["residual_energy"] = total
            info["residual_captured"] = sum(e * c for e, c in energies) / total if total > 0 else 0.0
    else:
        config = adapter_files.read_stock_config(adapter_path)
        modules = adapter_files.adapter_shapes(adapter_files.load_weights_file(adapter_path)[1])
        rank = (config.get("lora_parameters") or {}).get("rank")
        info = {
            "base_model": config.get("model"),
            "fine_tune_type": config.get("fine_tune_type", "lora"),
            "rank_scaling": "stock",
            "base_rank": rank,
            "padded_rank": None,
            "budget_params": None,
        }
    groups = {}
    total = 0
    for entry in modules.values():
        params = entry["rank"] * (entry["input_dims"] + entry["output_dims"])
        total += params
        g = groups.setdefault(entry.get("bits"), {"ranks": [], "params": 0})
        g["ranks"].append(entry["rank"])
        g["params"] += params
    info["trainable_params"] = total
    info["num_modules"] = len(modules)
    info["by_bits"] = [
        {
            "bits": bits,
            "modules": len(g["ranks"]),
            "rank_min": min(g["ranks"]),
            "rank_mean": sum(g["ranks"]) / len(g["ranks"]),
            "rank_max": max(g["ranks"]),
            "params": g["params"],
        }
        for bits, g in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    ]
    return info


def format_summary(info: dict) -> str:
    """The summary as the table the CLI prints."""
    lines = [
        f"base model:        {info['base_model']}",
        f"fine-tune type:    {info['fine_tune_type']}",
        f"rank scaling:      {info['rank_scaling']} (base rank {info['base_rank']}"
        + (f", stored padded to {info['padded_rank']}" if info.get("padded_rank") else "")
        + ")",
        f"trainable params:  {info['trainable_params']:,} in {info['num_modules']} modules"
        + (f" (constant-rank budget {info['budget_params']:,})" if info.get("budget_params") else ""),
        *(
            [
                f"init:              {info.get('init', 'zero')}",
                f"residual removable: {info['residual_captured']:.2%} of ||W - Q||^2 = {info['residual_energy']:.4g} "
                "(best rank-r approximation at each module's rank)",
            ]
            if "residual_captured" in info
            else []
        ),
        "rank distribution by bits:",
        f"  {'bits':>5} {'modules':>8} {'rank min':>9} {'mean':>7} {'max':>5} {'params':>12}",
    ]
    for g in info["by_bits"]:
        bits = "?" if g["bits"] is None else f"{g['bits']:g}"
        lines.append(
            f"  {bits:>5} {g['modules']:>8} {g['rank_min']:>9} {g['rank_mean']:>7.2f} "
            f"{g['rank_max']:>5} {g['params']:>12,}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.lora.info", description="Describe a (rank-scaled) LoRA adapter directory."
    )
    parser.add_argument("adapter_path", help="Adapter directory (adapters.safetensors, adapter_config.json).")
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    args = parser.parse_args(argv)
    with user_errors(parser.prog):
        info = summarize(args.adapter_path)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))


if __name__ == "__main__":
    main()
