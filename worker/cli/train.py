"""`cxr synth` and `cxr train`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from db.vocabulary import DISCLAIMER

STAGE_CHOICES = ("pneumonia", "infection", "both")


def register(sub: argparse._SubParsersAction) -> None:
    _register_synth(sub)
    _register_train(sub)


def _register_synth(sub: argparse._SubParsersAction) -> None:
    synth = sub.add_parser(
        "synth",
        help="write a synthetic chest-X-ray-like data set in the Kaggle layout",
        description="Generate a learnable synthetic data set (NORMAL, BACTERIA, VIRUS) in the "
        "Kaggle folder layout and naming, marked synthetic, for demos and tests.",
    )
    synth.add_argument("--out", type=Path, required=True, help="folder to write (ROOT)")
    synth.add_argument("--n", type=int, default=600, help="number of images (default 600)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--format", choices=("jpeg", "dicom"), default="jpeg",
                       help="jpeg (Kaggle's) or dicom: the same drawings as DICOM files with "
                       "mixed photometric interpretations, bit depths and transfer syntaxes")
    synth.set_defaults(func=cmd_synth)


def _register_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train, evaluate and register a model for one or both stages",
        description="Transfer learning on a Kaggle-layout data set: patient-grouped validation "
        "split, frozen-base head training (on cached features), fine-tuning, threshold tuned on "
        "validation, evaluation on the test split, then a registered model bundle with metrics, "
        "plots and report. " + DISCLAIMER,
    )
    train.add_argument("--data", type=Path, required=True,
                       help="ROOT with {train,val,test}/{NORMAL,PNEUMONIA}/")
    train.add_argument("--stage", choices=STAGE_CHOICES, default="both")
    train.add_argument("--backbone", default="vgg16",
                       help="vgg16, vgg19, xception, resnet50, resnet50v2, inceptionv3, "
                       "densenet121, mobilenetv2, efficientnetb0 or smallcnn (default vgg16)")
    train.add_argument("--epochs", type=int, default=10, help="phase-1 (head) epochs; all "
                       "epochs for smallcnn (default 10)")
    train.add_argument("--fine-tune-epochs", type=int, default=5,
                       help="phase-2 epochs with the top of the base unfrozen (default 5)")
    train.add_argument("--img-size", type=int, default=None,
                       help="square input size (default: the backbone's, or the --init-from "
                       "model's)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--weights", default="imagenet",
                       help="imagenet (Keras cache/download), none, or a weights file PATH")
    train.add_argument("--init-from", metavar="STAGE:VERSION|FILE",
                       help="start from a registered version or a .keras file (lineage kept)")
    train.add_argument("--val-fraction", type=float, default=0.15,
                       help="share of train+val images (by patient) used for validation")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--target-sensitivity", type=float, default=0.95,
                       help="the threshold is tuned on validation to reach this sensitivity")
    train.add_argument("--max-error", type=float, default=0.05,
                       help="error rate allowed outside each stage's uncertain band, chosen "
                       "on validation; inside it a label is flagged for review (default 0.05)")
    train.add_argument("--no-gate", dest="gate", action="store_false",
                       help="do not fit stage 1's input gate (out-of-distribution refusal)")
    train.add_argument("--unfreeze-layers", type=int, default=None,
                       help="top base layers trained in phase 2 (default: per backbone)")
    train.add_argument("--patience", type=int, default=5,
                       help="early-stopping patience in epochs, on validation AUC")
    train.add_argument("--learning-rate", type=float, default=1e-3,
                       help="phase-1 (or smallcnn) Adam learning rate (default 1e-3)")
    train.add_argument("--fine-tune-learning-rate", type=float, default=1e-5,
                       help="phase-2 Adam learning rate (default 1e-5)")
    train.add_argument("--no-augment", dest="augment", action="store_false",
                       help="train without augmentation")
    train.add_argument("--flip", action="store_true",
                       help="add horizontal flips to augmentation (off: it mirrors anatomy)")
    train.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                       help="train the head through the frozen base each epoch (with augmentation)")
    train.add_argument("--promote", action="store_true",
                       help="make the new versions the production models")
    train.set_defaults(func=cmd_train)


def cmd_synth(args: argparse.Namespace, settings) -> int:
    from trainer.synth.xrays import generate_dataset

    generate_dataset(args.out, args.n, args.seed, fmt=args.format)
    kind = "DICOM " if args.format == "dicom" else ""
    print(f"wrote a synthetic {kind}data set of {args.n} images to {args.out}")
    return 0


def resolve_init_from(value: str | None, stage: str, settings):
    """(model file, parent version, manifest or None) for ``--init-from STAGE:VERSION|FILE``."""
    from db.exceptions import CxrError

    if not value:
        return None, None, None
    head, _, tail = value.partition(":")
    if head in ("pneumonia", "infection") and tail.lower().removeprefix("v").isdigit():
        from db import registry
        from db.session import session_scope
        from trainer.model.bundle import MODEL_FILE, Manifest

        if head != stage:
            raise CxrError(f"--init-from {value} is a {head} model; this run trains {stage}")
        with session_scope(settings.db_url) as session:
            mv = registry.get_version(session, head, int(tail.lower().removeprefix("v")))
            bundle = settings.models_path / mv.bundle_path
            version = mv.version
        manifest = Manifest.read(bundle / "manifest.json")
        if not manifest.preprocessing_in_model or manifest.output != "sigmoid":
            raise CxrError(f"--init-from {value}: only trainer-made bundles can be fine-tuned")
        return bundle / MODEL_FILE, version, manifest
    path = Path(value)
    if not path.is_file():
        raise CxrError(f"--init-from {value}: no such file and not STAGE:VERSION")
    return path, None, None


def cmd_train(args: argparse.Namespace, settings) -> int:
    from db.exceptions import CxrError
    from db.migrate import ensure_schema

    if ensure_schema(settings.db_url):
        print("created the database schema (first use of this database)")
    from trainer.model.runtime import describe_device
    from trainer.training.backbones import get_spec
    from trainer.training.train import publish, train_stage

    stages = ["pneumonia", "infection"] if args.stage == "both" else [args.stage]
    if args.init_from and len(stages) > 1:
        raise CxrError("--init-from needs a single --stage")
    try:
        spec = get_spec(args.backbone)
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    splits, synthetic, fingerprint = _load_data(args)
    print(describe_device())

    results = {}
    with tempfile.TemporaryDirectory(prefix="cxr-train-") as tmp:
        for stage in stages:
            config, model_file, parent = _stage_config(args, stage, spec, settings)
            print(f"\n== training {stage}: {config.backbone} at {config.img_size} px ==")
            results[stage] = train_stage(
                splits, config, Path(tmp) / stage, init_model_path=model_file,
                parent_version=parent, synthetic=synthetic,
            )
        _add_cascade(results, splits.test, settings)
        versions = {
            stage: publish(
                result, models_dir=settings.models_path, db_url=settings.db_url,
                dataset_fingerprint=fingerprint, promote=args.promote,
            )
            for stage, result in results.items()
        }
    _print_summary(results, versions, synthetic)
    return 0


def _load_data(args: argparse.Namespace):
    """(splits, synthetic, dataset fingerprint) of ``--data``; prints its summary."""
    from trainer.training.data import (
        dataset_fingerprint,
        is_synthetic,
        scan_dataset,
        split_records,
        summarize,
    )

    records = scan_dataset(args.data)
    splits = split_records(records, val_fraction=args.val_fraction, seed=args.seed)
    synthetic = is_synthetic(args.data)
    fingerprint = dataset_fingerprint(records, args.data)
    print(f"data {args.data}{' (synthetic)' if synthetic else ''}: {summarize(splits)}")
    return splits, synthetic, fingerprint


def _stage_config(args: argparse.Namespace, stage: str, spec, settings):
    """(TrainConfig, model file to start from or None, parent version or None) for ``stage``:
    the backbone and input size come from ``--init-from``'s model when there is one."""
    from trainer.training.train import TrainConfig

    model_file, parent, manifest = resolve_init_from(args.init_from, stage, settings)
    backbone = manifest.backbone if manifest else spec.name
    size = args.img_size or (manifest.input_size if manifest else spec.default_size)
    if model_file is not None and manifest is None and args.img_size is None:
        size = _model_input_size(model_file)
    config = TrainConfig(
        stage=stage, backbone=backbone, img_size=size, epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs, batch_size=args.batch_size,
        weights=str(args.weights), seed=args.seed,
        unfreeze_layers=args.unfreeze_layers, patience=args.patience,
        target_sensitivity=args.target_sensitivity, feature_cache=args.feature_cache,
        max_error=args.max_error, gate=args.gate,
        flip=args.flip, val_fraction=args.val_fraction, init_from=args.init_from,
        learning_rate=args.learning_rate,
        fine_tune_learning_rate=args.fine_tune_learning_rate, augment=args.augment,
    )
    return config, model_file, parent


def _model_input_size(path: Path) -> int:
    from trainer.model.bundle import load_keras_model

    model = load_keras_model(path)
    return int(model.inputs[0].shape[1])


def _add_cascade(results: dict, test_records, settings) -> None:
    """Three-class evaluation when both stages exist: this run's models, else production."""
    from trainer.training.train import evaluate_cascade_on, model_predictor, write_outputs

    stages = {}
    for stage in ("pneumonia", "infection"):
        if stage in results:
            r = results[stage]
            stages[stage] = (model_predictor(r.model), r.config.img_size, r.threshold)
        else:
            loaded = _production_bundle(stage, settings)
            if loaded is None:
                return
            m = loaded.manifest
            stages[stage] = (loaded.predict_proba, m.input_size, m.threshold)
            print(f"cascade uses production {stage}/v{m.version}")
    cascade = evaluate_cascade_on(test_records, stages["pneumonia"], stages["infection"])
    for result in results.values():
        result.metrics["cascade"] = cascade
        write_outputs(result)


def _production_bundle(stage: str, settings):
    from db import registry
    from db.session import session_scope
    from trainer.model.bundle import load_bundle

    with session_scope(settings.db_url) as session:
        mv = registry.get_production(session, stage)
        path = settings.models_path / mv.bundle_path if mv else None
    return load_bundle(path) if path else None


def _fmt(value) -> str:
    return "  n/a" if value is None or value != value else f"{value:.3f}"


def _print_summary(results: dict, versions: dict, synthetic: bool) -> None:
    print("\nTest split" + (" (SYNTHETIC DATA)" if synthetic else "") + ":")
    header = ("model", "status", "acc", "sens", "spec", "prec", "f1", "auc", "auc 95% CI",
              "threshold")
    print("  ".join(f"{h:>12}" for h in header))
    for stage, result in results.items():
        mv, t = versions[stage], result.metrics["test"]
        lo, hi = t["ci95"]["auc"]
        row = [f"{stage}/v{mv.version}", str(mv.status)]
        row += [_fmt(t[k]) for k in ("accuracy", "sensitivity", "specificity", "precision",
                                     "f1", "auc")]
        row += [f"{_fmt(lo)}-{_fmt(hi)}", f"{result.threshold:.4f}"]
        print("  ".join(f"{c:>12}" for c in row))
    cascade = next(iter(results.values())).metrics.get("cascade")
    if cascade:
        print(f"three-class cascade accuracy {_fmt(cascade['accuracy'])} on {cascade['n']} "
              "test images")
    for stage, published in versions.items():
        print(f"{stage}: bundle, metrics.json, report.md and plots in {published.bundle_dir}")
    timing = [r.metrics["timing"] for r in results.values() if "epoch_time_ratio" in
              r.metrics["timing"]]
    for t in timing:
        print(f"phase-1 epoch time: cached features {t['cached_epoch_s']:.2f} s vs "
              f"{t['uncached_epoch_s']:.2f} s uncached ({t['epoch_time_ratio']:.1f}x)")
    print(DISCLAIMER)
