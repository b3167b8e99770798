"""The model kept fresh: the click log's export (`clicklog`), the gate that scores a candidate
against the live bundle as the service would (`gate`), and the refresh cycle (`refresh`)."""
