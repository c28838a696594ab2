"""An example COMP extension: POST a summary of every failed task to a webhook.

Built from the event catalog (``comp_common.catalog``, ``docs/events.md``): it subscribes
to the task-event family the catalog names and validates each body as the catalog's model.
"""
