"""The user's ClientApp: fedsms's built-in trainer on the user's model and images.

The images come from the SuperNode's ``data-dir`` (``fedsms-client --data-dir DIR``);
every training setting comes from the server with each message, so this app reads no
run config.
"""

from vision_task import PatternNet, load_splits

from fedsms_client.app import make_client_app


def data_fn(run, data_dir):
    return load_splits(data_dir, run.heldout_fraction, run.seed)


def model_fn(run, splits):
    return PatternNet(splits.num_classes)


app = make_client_app(model_fn=model_fn, data_fn=data_fn)
