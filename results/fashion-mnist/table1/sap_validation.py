"""SAP's clean accuracy on the fashion-mnist validation split by sap_frac, over draws (tuning: validation only).
Usage: python study.py RUN_DIR (a standard model trained on fashion-mnist-val)."""
import json, sys, torch
from topkconv import convert
from topkconv.checkpoint import load_checkpoint
from topkconv.data import load_data

torch.set_num_threads(1)
model, spec = load_checkpoint(sys.argv[1])
x, y = load_data(spec.data).test_tensors()
assert spec.data.name == "fashion-mnist-val", spec.data.name
rows = []
with torch.inference_mode():
    plain = (model(x).argmax(1) == y).float().mean().item()
    rows.append({"sap_frac": None, "clean_mean": plain, "draws": 1})
    for frac in (0.5, 0.8, 1.0):
        sap = convert(model, "sap", sap_frac=frac).eval()
        accs = [(sap(x).argmax(1) == y).float().mean().item() for _ in range(5)]
        rows.append({"sap_frac": frac, "clean_mean": sum(accs) / len(accs), "clean_draws": accs, "draws": len(accs)})
        print(rows[-1], flush=True)
print(json.dumps({"n": len(y), "rows": rows}, indent=1))
