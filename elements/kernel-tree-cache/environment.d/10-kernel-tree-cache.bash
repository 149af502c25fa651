# The project's repository whose branch head the image holds built (README.rst).
# Unset DIB_KERNEL_TREE_REPO: an image without a cached tree.
export DIB_KERNEL_TREE_REPO=${DIB_KERNEL_TREE_REPO:-}
export DIB_KERNEL_TREE_REF=${DIB_KERNEL_TREE_REF:-master}
export DIB_KERNEL_TREE_PROJECT=${DIB_KERNEL_TREE_PROJECT:-linux}
# A host directory holding a compiler cache, read (never written) by the build.
export DIB_KERNEL_TREE_CCACHE=${DIB_KERNEL_TREE_CCACHE:-}
# 1: also KUnit's UML kernel, prebuilt in ~zuul/src/<project>-kunit (README.rst).
export DIB_KERNEL_TREE_KUNIT=${DIB_KERNEL_TREE_KUNIT:-}
