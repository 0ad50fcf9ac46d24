def twice(event):
    return [event, event]
