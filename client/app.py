"""NEARL ClientApp: the code each hospital runs for every message of the federation.

``train``: load the global adapters from the message, evaluate them on the site's val
split first (when the server asks; it saves a process start per round), train locally
for the configured epochs, reply with the adapter tensors and scalar metrics.
``evaluate``: val/test metrics of the global adapters.  Both replies pass the egress
check (:mod:`client.egress`).  The work itself lives in :mod:`client.task`.
This is the cold site's app (a process per message): the site's verdict after a run's last
evaluate is written by a detached process (:func:`client.site_report.spawn`).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import site_report
from client.secagg import stage_reply
from client.task import evaluate_reply, train_reply

app = ClientApp()
site_report.use_runner(site_report.spawn)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context)


@app.train("secagg")
def secagg(msg: Message, context: Context) -> Message:
    """Secure aggregation's key setup, key sharing and unmasking (client/secagg.py)."""
    return stage_reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_reply(msg, context)
