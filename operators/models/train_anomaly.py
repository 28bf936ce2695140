#!/usr/bin/env python3
"""Train the telemetry anomaly detector and export it to ONNX.

Reproducible: fixed seed, single-threaded BLAS, float64 training, float32 export.

Usage:
    python train_anomaly.py --out DIR

Writes DIR/anomaly_detector.onnx and DIR/anomaly_detector.golden.json and prints
the golden scores to stdout (training log goes to stderr).

Model input is the z-score normalized feature vector, in this order:
    cpu_percent, memory_percent, disk_percent, temperature, load_avg
normalized as (x - mean) / std with the mean/std written to the golden file and
the ONNX metadata. Output is the anomaly probability in [0, 1]; > threshold = anomaly.
"""
import os

# Must be set before numpy is imported: no multithreaded BLAS nondeterminism.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SEED = 20240601
MODEL_NAME = "telemetry-anomaly"
MODEL_VERSION = 1
FEATURES = ["cpu_percent", "memory_percent", "disk_percent", "temperature", "load_avg"]
THRESHOLD = 0.5
HIDDEN = (16, 8)
OPSET = 13
IR_VERSION = 8

N_NORMAL = 6000
N_PER_ANOMALY_KIND = 600  # 5 kinds -> 3000 anomalies
TEST_FRACTION = 0.2
EPOCHS = 3000
LEARNING_RATE = 0.01
L2 = 1e-5


# --------------------------------------------------------------------------- data
def gen_normal(rng, n):
    """Healthy edge devices (Raspberry Pi / cloud VMs)."""
    cpu = rng.uniform(5.0, 75.0, n)
    load = np.clip(cpu / 25.0 + rng.normal(0.0, 0.35, n), 0.0, None)
    mem = rng.uniform(30.0, 75.0, n)
    disk = rng.uniform(10.0, 60.0, n)
    temp = 40.0 + 0.25 * cpu + rng.normal(0.0, 3.0, n)
    return np.stack([cpu, mem, disk, temp, load], axis=1)


def gen_anomalies(rng, n):
    """Five kinds of anomaly, each a normal sample with one failure injected."""
    kinds = []
    # 1. cpu pegged with high load
    x = gen_normal(rng, n)
    x[:, 0] = rng.uniform(95.0, 100.0, n)
    x[:, 4] = rng.uniform(5.0, 14.0, n)
    x[:, 3] = 40.0 + 0.25 * x[:, 0] + rng.normal(0.0, 3.0, n)
    kinds.append(x)
    # 2. overheating
    x = gen_normal(rng, n)
    x[:, 3] = rng.uniform(80.0, 100.0, n)
    kinds.append(x)
    # 3. memory exhausted
    x = gen_normal(rng, n)
    x[:, 1] = rng.uniform(95.0, 100.0, n)
    kinds.append(x)
    # 4. disk full
    x = gen_normal(rng, n)
    x[:, 2] = rng.uniform(95.0, 100.0, n)
    kinds.append(x)
    # 5. cpu / load inconsistent: high load with an idle cpu (blocked on I/O, stuck procs)
    x = gen_normal(rng, n)
    x[:, 0] = rng.uniform(1.0, 10.0, n)
    x[:, 4] = rng.uniform(6.0, 12.0, n)
    x[:, 3] = 40.0 + 0.25 * x[:, 0] + rng.normal(0.0, 3.0, n)
    kinds.append(x)
    return np.concatenate(kinds, axis=0)


def make_dataset(rng):
    normal = gen_normal(rng, N_NORMAL)
    anom = gen_anomalies(rng, N_PER_ANOMALY_KIND)
    x = np.concatenate([normal, anom], axis=0)
    y = np.concatenate([np.zeros(len(normal)), np.ones(len(anom))])
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = int(round(len(x) * TEST_FRACTION))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


# -------------------------------------------------------------------------- model
def sigmoid64(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def init_params(rng):
    sizes = [len(FEATURES), *HIDDEN, 1]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
        b = np.zeros(fan_out)
        params += [w, b]
    return params


def forward64(params, x):
    w1, b1, w2, b2, w3, b3 = params
    z1 = x @ w1 + b1
    h1 = np.maximum(z1, 0.0)
    z2 = h1 @ w2 + b2
    h2 = np.maximum(z2, 0.0)
    z3 = h2 @ w3 + b3
    return (z1, h1, z2, h2, z3)


def train(params, x, y):
    """Full-batch Adam on binary cross-entropy (with logits), float64."""
    y = y.reshape(-1, 1)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    n = len(x)
    for t in range(1, EPOCHS + 1):
        w1, _, w2, _, w3, _ = params
        z1, h1, z2, h2, z3 = forward64(params, x)
        p = sigmoid64(z3)
        dz3 = (p - y) / n
        gw3 = h2.T @ dz3 + L2 * w3
        gb3 = dz3.sum(axis=0)
        dz2 = (dz3 @ w3.T) * (z2 > 0)
        gw2 = h1.T @ dz2 + L2 * w2
        gb2 = dz2.sum(axis=0)
        dz1 = (dz2 @ w2.T) * (z1 > 0)
        gw1 = x.T @ dz1 + L2 * w1
        gb1 = dz1.sum(axis=0)
        grads = [gw1, gb1, gw2, gb2, gw3, gb3]
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1**t)
            vhat = v[i] / (1 - b2**t)
            params[i] = params[i] - LEARNING_RATE * mhat / (np.sqrt(vhat) + eps)
        if t % 500 == 0 or t == 1:
            pc = np.clip(p, 1e-12, 1 - 1e-12)
            loss = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
            print(f"epoch {t:5d}  loss {loss:.6f}", file=sys.stderr)
    return params


# ----------------------------------------------------------- float32 inference
def normalize32(raw, mean32, std32):
    return (np.asarray(raw, dtype=np.float32) - mean32) / std32


def forward32(params32, x32):
    """Exactly the ONNX graph: MatMul, Add, Relu, MatMul, Add, Relu, MatMul, Add, Sigmoid."""
    w1, b1, w2, b2, w3, b3 = params32
    h = np.maximum(np.matmul(x32, w1) + b1, np.float32(0))
    h = np.maximum(np.matmul(h, w2) + b2, np.float32(0))
    z = np.matmul(h, w3) + b3
    one = np.float32(1)
    return one / (one + np.exp(-z))


# ----------------------------------------------------------------------- export
def export_onnx(params32, mean, std, path):
    w1, b1, w2, b2, w3, b3 = params32
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(b1, "B1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(b2, "B2"),
        numpy_helper.from_array(w3, "W3"),
        numpy_helper.from_array(b3, "B3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "W1"], ["mm1"], name="fc1_matmul"),
        helper.make_node("Add", ["mm1", "B1"], ["z1"], name="fc1_add"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["h1", "W2"], ["mm2"], name="fc2_matmul"),
        helper.make_node("Add", ["mm2", "B2"], ["z2"], name="fc2_add"),
        helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
        helper.make_node("MatMul", ["h2", "W3"], ["mm3"], name="fc3_matmul"),
        helper.make_node("Add", ["mm3", "B3"], ["logit"], name="fc3_add"),
        helper.make_node("Sigmoid", ["logit"], ["score"], name="sigmoid"),
    ]
    doc = (
        f"{MODEL_NAME} v{MODEL_VERSION}: MLP 5->16->8->1 edge telemetry anomaly detector. "
        f"Input 'features' float32 [N,5], z-score normalized (x - mean) / std, feature order "
        f"{FEATURES}, mean {mean}, std {std}. Output 'score' float32 [N,1] = P(anomaly); "
        f"anomaly if score > {THRESHOLD}. Generated by operators/models/train_anomaly.py."
    )
    graph = helper.make_graph(
        nodes,
        MODEL_NAME,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", len(FEATURES)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        initializer=inits,
        doc_string=doc,
    )
    model = helper.make_model(
        graph,
        producer_name="primespark train_anomaly.py",
        producer_version=str(MODEL_VERSION),
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=doc,
        model_version=MODEL_VERSION,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "name": MODEL_NAME,
            "version": str(MODEL_VERSION),
            "features": json.dumps(FEATURES),
            "mean": json.dumps(mean),
            "std": json.dumps(std),
            "threshold": repr(THRESHOLD),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    with open(path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))


# ----------------------------------------------------------------- golden cases
# raw = [cpu_percent, memory_percent, disk_percent, temperature, load_avg]
GOLDEN_CASES = [
    ("normal_idle_pi", [12.0, 42.0, 31.0, 43.5, 0.5]),
    ("normal_typical", [35.0, 55.0, 40.0, 49.0, 1.4]),
    ("normal_busy_vm", [65.0, 70.0, 55.0, 57.0, 2.7]),
    ("anomaly_cpu_pegged", [99.0, 60.0, 40.0, 66.0, 9.5]),
    ("anomaly_overheat", [40.0, 50.0, 35.0, 86.0, 1.6]),
    ("anomaly_memory_full", [30.0, 97.5, 40.0, 48.0, 1.2]),
    ("anomaly_disk_full", [25.0, 50.0, 98.0, 46.0, 1.0]),
    ("anomaly_load_without_cpu", [5.0, 45.0, 30.0, 41.0, 8.0]),
    ("borderline_warm", [55.0, 60.0, 45.0, 72.0, 2.2]),
    ("borderline_memory_high", [40.0, 85.0, 40.0, 50.0, 1.6]),
    ("borderline_disk_high", [30.0, 50.0, 80.0, 47.0, 1.2]),
    ("borderline_cpu_high", [88.0, 65.0, 40.0, 62.0, 3.6]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(SEED)
    x_train, y_train, x_test, y_test = make_dataset(rng)

    normal_train = x_train[y_train == 0]
    mean = [round(float(v), 4) for v in normal_train.mean(axis=0)]
    std = [round(float(v), 4) for v in normal_train.std(axis=0)]
    mean64, std64 = np.array(mean), np.array(std)

    params = train(init_params(rng), (x_train - mean64) / std64, y_train)
    params32 = [np.ascontiguousarray(p, dtype=np.float32) for p in params]
    mean32, std32 = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)

    def accuracy(x, y):
        s = forward32(params32, normalize32(x, mean32, std32))[:, 0]
        return float(np.mean((s > THRESHOLD) == (y == 1)))

    train_acc, test_acc = accuracy(x_train, y_train), accuracy(x_test, y_test)
    print(f"train accuracy {train_acc:.4f} ({len(x_train)} samples)", file=sys.stderr)
    print(f"test accuracy  {test_acc:.4f} ({len(x_test)} samples)", file=sys.stderr)
    print(f"mean {mean}", file=sys.stderr)
    print(f"std  {std}", file=sys.stderr)

    onnx_path = os.path.join(args.out, "anomaly_detector.onnx")
    export_onnx(params32, mean, std, onnx_path)

    cases = []
    for name, raw in GOLDEN_CASES:
        xn = normalize32([raw], mean32, std32)
        score = forward32(params32, xn)[0, 0]
        cases.append(
            {
                "name": name,
                "raw": [float(v) for v in raw],
                "normalized": [float(v) for v in xn[0]],
                "score": float(score),
            }
        )
    golden = {
        "model": MODEL_NAME,
        "features": FEATURES,
        "mean": mean,
        "std": std,
        "threshold": THRESHOLD,
        "cases": cases,
    }
    # json.dumps writes floats with repr(), i.e. full round-trip precision.
    with open(os.path.join(args.out, "anomaly_detector.golden.json"), "w") as f:
        json.dump(golden, f, indent=2)
        f.write("\n")

    for c in cases:
        print(f"{c['name']:26s} raw={c['raw']} score={c['score']!r}")


if __name__ == "__main__":
    main()
