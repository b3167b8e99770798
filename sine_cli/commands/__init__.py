"""One module per `sine` command, each holding its parser (`add`) beside its handler (`run`)."""
from . import build_index, demo, evaluate, export, export_clicks, fetch_bundle, load_histories, refresh, serve, train

COMMANDS = (train, evaluate, export, build_index, serve, load_histories, demo, fetch_bundle,
            export_clicks, refresh)
