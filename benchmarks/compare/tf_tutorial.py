"""Reference: the TensorFlow image-segmentation tutorial's Keras pipeline, as a user would run it.

Runs in its own virtualenv (benchmarks/.envs/tf, made by compare.py); never imported by pixelseg.
Differences from the tutorial, all forced by the benchmark setting and applied to every framework:
- data comes from the official Oxford-IIIT Pet file layout (read with Pillow, decoded by content)
  instead of `tfds.load`, fed through `tf.data.Dataset.from_generator` into the tutorial's own
  `map(load_image) -> cache -> shuffle -> batch -> repeat -> map(Augment) -> prefetch` chain;
- `MobileNetV2(weights=None)`: nothing may be downloaded, so every framework starts from random weights;
- `VALIDATION_STEPS` is at least 1 (the tutorial's formula gives 0 on small test splits);
- no `DisplayCallback` (it draws notebook figures).
The `pix2pix.upsample` block is copied from tensorflow_examples (not on PyPI).

    python tf_tutorial.py train   --data-root D --freeze yes --epochs 3
    python tf_tutorial.py infer   --iters 10
    python tf_tutorial.py quality --data-root PETS --budget 120 --t0 <launch time>
Each prints one JSON line.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (for common.py; this env has no pixelseg)
import common  # noqa: E402  (this folder)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BATCH_SIZE = 64
BUFFER_SIZE = 1000
OUTPUT_CLASSES = 3


# ---- the tutorial's code, as published ------------------------------------------------------

def normalize(input_image, input_mask):
    input_image = tf.cast(input_image, tf.float32) / 255.0
    input_mask -= 1
    return input_image, input_mask


def make_load_image(size):
    def load_image(datapoint):
        input_image = tf.image.resize(datapoint["image"], (size, size))
        input_mask = tf.image.resize(datapoint["segmentation_mask"], (size, size),
                                     method=tf.image.ResizeMethod.NEAREST_NEIGHBOR)
        return normalize(input_image, input_mask)
    return load_image


class Augment(tf.keras.layers.Layer):
    def __init__(self, seed=42):
        super().__init__()
        # both use the same seed, so they'll make the same random changes.
        self.augment_inputs = tf.keras.layers.RandomFlip(mode="horizontal", seed=seed)
        self.augment_labels = tf.keras.layers.RandomFlip(mode="horizontal", seed=seed)

    def call(self, inputs, labels):
        inputs = self.augment_inputs(inputs)
        labels = self.augment_labels(labels)
        return inputs, labels


def upsample(filters, size, apply_dropout=False):
    """tensorflow_examples.models.pix2pix.upsample (norm_type='batchnorm')."""
    initializer = tf.random_normal_initializer(0.0, 0.02)
    result = tf.keras.Sequential()
    result.add(tf.keras.layers.Conv2DTranspose(filters, size, strides=2, padding="same",
                                               kernel_initializer=initializer, use_bias=False))
    result.add(tf.keras.layers.BatchNormalization())
    if apply_dropout:
        result.add(tf.keras.layers.Dropout(0.5))
    result.add(tf.keras.layers.ReLU())
    return result


def unet_model(output_channels: int, size: int, freeze: bool):
    base_model = tf.keras.applications.MobileNetV2(input_shape=[size, size, 3], include_top=False, weights=None)
    layer_names = ["block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu",
                   "block_16_project"]
    base_model_outputs = [base_model.get_layer(name).output for name in layer_names]
    down_stack = tf.keras.Model(inputs=base_model.input, outputs=base_model_outputs)
    down_stack.trainable = not freeze
    up_stack = [upsample(512, 3), upsample(256, 3), upsample(128, 3), upsample(64, 3)]

    inputs = tf.keras.layers.Input(shape=[size, size, 3])
    skips = down_stack(inputs)
    x = skips[-1]
    skips = reversed(skips[:-1])
    for up, skip in zip(up_stack, skips):
        x = up(x)
        x = tf.keras.layers.Concatenate()([x, skip])
    last = tf.keras.layers.Conv2DTranspose(filters=output_channels, kernel_size=3, strides=2, padding="same")
    x = last(x)
    return tf.keras.Model(inputs=inputs, outputs=x)


def compiled_model(size: int, freeze: bool):
    model = unet_model(OUTPUT_CLASSES, size, freeze)
    model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


# ---- data: the tutorial's tf.data chain over files in the official layout --------------------

def pets_source(root: Path, split: str):
    names = common.read_split_names(root, split)
    readable = [n for n in names if (root / "images" / f"{n}.jpg").is_file()]

    def gen():
        for name in readable:
            sample = common.read_pet(root, name)
            if sample is None:
                continue
            image, mask = sample
            # tfds hands over the raw trimap (values 1..3) with a channel axis; so do we.
            yield {"image": image, "segmentation_mask": (mask + 1)[..., None]}

    sig = {"image": tf.TensorSpec((None, None, 3), tf.uint8),
           "segmentation_mask": tf.TensorSpec((None, None, 1), tf.uint8)}
    return tf.data.Dataset.from_generator(gen, output_signature=sig), len(readable)


def tutorial_batches(root: Path, size: int):
    train_src, n_train = pets_source(root, "trainval")
    test_src, n_test = pets_source(root, "test")
    load_image = make_load_image(size)
    train_images = train_src.map(load_image, num_parallel_calls=tf.data.AUTOTUNE)
    test_images = test_src.map(load_image, num_parallel_calls=tf.data.AUTOTUNE)
    train_batches = (train_images.cache().shuffle(BUFFER_SIZE).batch(BATCH_SIZE).repeat().map(Augment())
                     .prefetch(buffer_size=tf.data.AUTOTUNE))
    test_batches = test_images.batch(BATCH_SIZE)
    steps_per_epoch = max(1, n_train // BATCH_SIZE)
    validation_steps = max(1, n_test // BATCH_SIZE // 5)
    return train_batches, test_batches, steps_per_epoch, validation_steps


class EpochTimer(tf.keras.callbacks.Callback):
    """Training time per epoch: from epoch start to the end of its last training batch (validation,
    which Keras runs before on_epoch_end, is left out, as pixelseg's train_images_per_s leaves it out)."""

    def __init__(self, budget: common.Budget | None = None):
        super().__init__()
        self.times, self.budget, self.snapshot, self.epochs_in_budget = [], budget, None, 0
        self.cut = False

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = self.last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last = time.perf_counter()
        if self.budget is not None and self.budget.expired():
            self.cut = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(self.last - self.t0)
        # Time-to-quality keeps the weights of the last epoch that ended (validation included)
        # inside the budget: what a per-epoch checkpoint gives, as pixelseg's last.pt does.
        if self.budget is not None and not self.cut and not self.budget.expired():
            self.snapshot = self.model.get_weights()
            self.epochs_in_budget = epoch + 1


def device_info() -> dict:
    gpus = tf.config.list_physical_devices("GPU")
    return {"framework": f"tensorflow {tf.__version__} / keras {tf.keras.__version__}",
            "device": "GPU:0" if gpus else "CPU"}


def peak_device_memory() -> int | None:
    if tf.config.list_physical_devices("GPU"):
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    return None


# ---- tasks -------------------------------------------------------------------------------------

def task_train(args) -> dict:
    train_batches, test_batches, steps, vsteps = tutorial_batches(Path(args.data_root), args.size)
    model = compiled_model(args.size, args.freeze == "yes")
    timer = EpochTimer()
    model.fit(train_batches, epochs=args.epochs, steps_per_epoch=steps, validation_steps=vsteps,
              validation_data=test_batches, callbacks=[timer], verbose=0)
    per_epoch = [steps * BATCH_SIZE / t for t in timer.times]
    return {"task": "train", "freeze": args.freeze, "epochs": args.epochs, "steps_per_epoch": steps,
            "images_per_s_per_epoch": per_epoch, "train_images_per_s": common.summarise_epochs(per_epoch),
            "peak_device_mem_bytes": peak_device_memory()}


def task_infer(args) -> dict:
    model = compiled_model(args.size, freeze=False)
    rng = np.random.default_rng(0)
    xb = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
    x1 = xb[:1]
    # predict_on_batch runs Keras' compiled predict function: model.predict without its per-call
    # dataset/progress-bar overhead, so the reference is measured at its fastest.
    res = common.time_inference(lambda: np.asarray(model.predict_on_batch(xb)),
                                lambda: np.asarray(model.predict_on_batch(x1)), args)
    return dict(res, peak_device_mem_bytes=peak_device_memory())


def task_quality(args) -> dict:
    budget = common.Budget(args.t0, args.budget)
    tf.keras.utils.set_random_seed(args.seed)
    root = Path(args.data_root)
    train_batches, test_batches, steps, vsteps = tutorial_batches(root, args.size)
    model = compiled_model(args.size, args.freeze == "yes")
    timer = EpochTimer(budget)
    model.fit(train_batches, epochs=10**6, steps_per_epoch=steps, validation_steps=vsteps,
              validation_data=test_batches, callbacks=[timer], verbose=0)
    trained_s = budget.elapsed()
    result = {"task": "quality", "budget_s": args.budget, "epochs_in_budget": timer.epochs_in_budget,
              "stopped_at_s": trained_s, "test_miou": None}
    if timer.snapshot is None:
        result["note"] = "no epoch finished inside the budget"
        return result
    model.set_weights(timer.snapshot)
    x, y = common.eval_arrays(root, "test", args.size)
    conf = np.zeros((common.NUM_CLASSES,) * 2, np.int64)
    for i in range(0, len(x), BATCH_SIZE):
        logits = model.predict_on_batch(x[i:i + BATCH_SIZE].astype(np.float32) / 255.0)
        conf += common.confusion(np.asarray(logits).argmax(-1), y[i:i + BATCH_SIZE])
    result["test_miou"] = common.miou(conf)
    result["test_images"] = int(len(x))
    return result


def main(argv=None) -> int:
    p = common.runner_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    if args.t0 is None:
        args.t0 = time.time()
    result = {"runner": "tensorflow-tutorial", **device_info()}
    result.update({"train": task_train, "infer": task_infer, "quality": task_quality}[args.task](args))
    result["peak_rss_bytes_self"] = common.peak_rss_bytes()
    common.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
