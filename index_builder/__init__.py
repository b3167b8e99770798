"""The index side: the bundle contract (`bundle`), fetching published bundles (`fetch`), the
faiss build with its recall gate (`build`, `options`) and `sine build-index` (`make`)."""
