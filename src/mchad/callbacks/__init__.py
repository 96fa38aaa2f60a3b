"""Lightning callbacks that show what the hypersphere methods learn, one view per module.

Configured in ``config/callbacks/default.yaml``; each one can be switched off on the
command line (``~callbacks.embedding_animation``) and works with any :class:`~mchad.models.methods.Method`:

:class:`ValidationViews` (:mod:`.views`)
    At every validation: TensorBoard histograms of the OOD score (the distance to the
    nearest centre where the method has one, ``method.scores(out)["distance"]``, else its
    first score) of known vs. unknown samples, and the AUROC between them
    (``val/unknown/<score>/AUROC``). At the end of training: the validation embeddings with
    their labels in the TensorBoard projector and an image of the two score distributions.
:class:`EmbeddingAnimation` (:mod:`.animation`)
    With a 2-D embedding and a method with centres: one scatter plot per epoch of the
    validation embeddings, the centres and the radius/margin circles
    (``<run>/plots/embedding/epoch_XXX.png``, shared axis limits), assembled into
    ``<run>/embedding.gif`` at the end of training.
:class:`TestCasePlots` (:mod:`.case_plots`)
    After testing: per test case and score, the ID vs. OOD score histogram and the ROC curve
    (``<run>/plots/<case>_<score>_hist.png`` / ``_roc.png``), also as TensorBoard images.
:class:`HyperparameterLogger` (:mod:`.hparams`)
    After testing: the resolved configuration, flattened (``model.weight_center``, ...), as
    TensorBoard hyperparameters with the key metrics (``hp/...``) for the HPARAMS tab.

**Unknown samples at validation.** The validation set is a hold-out of the ID training set
and has no unknown samples; the test sets must never be looked at before testing. The
callbacks therefore score their own small, fixed set of unknown images, never a test set:
the outlier-exposure set (``datamodule.outliers``, i.e. G-MCHAD's training outliers) when
one is configured, otherwise noise images of the ID image shape (half Gaussian, mean 128 and
std 128 clipped, half uniform on [0, 255]) drawn with their own seed (``noise_seed``, not the
seed of the noise test cases). The same images are used at every epoch. The noise is of the
kind of two test cases' distributions (not the same images): use the validation AUROC to
watch training, not to select models for the noise test cases.

The callbacks sample the validation set themselves (the first ``max_samples`` images of the
hold-out, which is already in random order), run the model in eval mode without gradients
and use their own random generators: training is unchanged by them. Plots are rendered with
:mod:`mchad.results.plots` (Agg canvas, no display). Only the global-zero process writes.
The validation sample the views share, and when they are due: :mod:`.sample`; where they
write (run folder, TensorBoard): :mod:`.outputs`. The configs name each class by its module
(``mchad.callbacks.views.ValidationViews``).
"""
