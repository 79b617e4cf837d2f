"""One module or package per command: options checked, plan made from headers, the engine run, a report returned."""
