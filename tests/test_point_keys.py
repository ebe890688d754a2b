"""The packaged grids' point keys stay as they were: a key names a point's checkpoints and
database rows, so a change would retrain a user's finished sweep. The keys below were computed
on main at 946acfc (before methods became one file each), by grid.build_sweep on each packaged
grid; the methods grids may gain points (new methods), never lose or rename one."""
from fastfat.sweep import grid

DEMO_KEYS = [
    'digits_cnn_madry_eps0.1_s0_184e9b65',
    'digits_cnn_madry_eps0.1_s1_4e276d4c',
    'digits_cnn_madry_eps0.1_s2_68c2c2a2',
    'digits_cnn_madry_eps0.15_s0_c64df2b6',
    'digits_cnn_madry_eps0.15_s1_50a0c16d',
    'digits_cnn_madry_eps0.15_s2_84c8f534',
    'digits_cnn_madry_eps0.2_s0_868305d9',
    'digits_cnn_madry_eps0.2_s1_35455883',
    'digits_cnn_madry_eps0.2_s2_4824fbf0',
    'digits_cnn_madry_eps0.25_s0_d4df38d6',
    'digits_cnn_madry_eps0.25_s1_a6cbd498',
    'digits_cnn_madry_eps0.25_s2_7f9d0d67',
    'digits_cnn_fat-madry_eps0.1_lam0.5_s0_9d2d1618',
    'digits_cnn_fat-madry_eps0.1_lam0.5_s1_51af80a7',
    'digits_cnn_fat-madry_eps0.1_lam0.5_s2_e88ec0a0',
    'digits_cnn_fat-madry_eps0.1_lam1_s0_9700ab9d',
    'digits_cnn_fat-madry_eps0.1_lam1_s1_101cf85e',
    'digits_cnn_fat-madry_eps0.1_lam1_s2_7d23c6bf',
    'digits_cnn_fat-madry_eps0.15_lam0.5_s0_6e252b7f',
    'digits_cnn_fat-madry_eps0.15_lam0.5_s1_bf62e20c',
    'digits_cnn_fat-madry_eps0.15_lam0.5_s2_429a4f26',
    'digits_cnn_fat-madry_eps0.15_lam1_s0_a8fb27ec',
    'digits_cnn_fat-madry_eps0.15_lam1_s1_4023c051',
    'digits_cnn_fat-madry_eps0.15_lam1_s2_c89cdefd',
    'digits_cnn_fat-madry_eps0.2_lam0.5_s0_767d75ed',
    'digits_cnn_fat-madry_eps0.2_lam0.5_s1_7c98debb',
    'digits_cnn_fat-madry_eps0.2_lam0.5_s2_e1e3a266',
    'digits_cnn_fat-madry_eps0.2_lam1_s0_8831605a',
    'digits_cnn_fat-madry_eps0.2_lam1_s1_50ef9f6b',
    'digits_cnn_fat-madry_eps0.2_lam1_s2_c9cb9141',
    'digits_cnn_fat-madry_eps0.25_lam0.5_s0_e358376a',
    'digits_cnn_fat-madry_eps0.25_lam0.5_s1_7bcb74ba',
    'digits_cnn_fat-madry_eps0.25_lam0.5_s2_bdb4dab8',
    'digits_cnn_fat-madry_eps0.25_lam1_s0_0ccd3235',
    'digits_cnn_fat-madry_eps0.25_lam1_s1_b2216e7a',
    'digits_cnn_fat-madry_eps0.25_lam1_s2_6e721fe7',
]

METHODS_KEYS = [
    'digits_cnn_madry_eps0.2_s0_c0352d59',
    'digits_cnn_madry_eps0.2_s1_4a143d08',
    'digits_cnn_madry_eps0.2_s2_bf805ae8',
    'digits_cnn_fat-madry_eps0.2_lam0.5_s0_08d2a4c3',
    'digits_cnn_fat-madry_eps0.2_lam0.5_s1_6f5fadee',
    'digits_cnn_fat-madry_eps0.2_lam0.5_s2_a625da90',
    'digits_cnn_cfa-madry_eps0.2_s0_df371bf7',
    'digits_cnn_cfa-madry_eps0.2_s1_892d4bf6',
    'digits_cnn_cfa-madry_eps0.2_s2_63de3025',
    'digits_cnn_dafa-madry_eps0.2_s0_a91053bc',
    'digits_cnn_dafa-madry_eps0.2_s1_ebb90998',
    'digits_cnn_dafa-madry_eps0.2_s2_6481652f',
    'digits_cnn_trades_eps0.2_s0_38e3fcbc',
    'digits_cnn_trades_eps0.2_s1_7bfdddf2',
    'digits_cnn_trades_eps0.2_s2_72c127a1',
    'digits_cnn_fat-trades_eps0.2_lam0.5_s0_b77dc04c',
    'digits_cnn_fat-trades_eps0.2_lam0.5_s1_afe28035',
    'digits_cnn_fat-trades_eps0.2_lam0.5_s2_a524a4fd',
    'digits_cnn_cfa-trades_eps0.2_s0_6f7c0665',
    'digits_cnn_cfa-trades_eps0.2_s1_c5d9585f',
    'digits_cnn_cfa-trades_eps0.2_s2_6baba2f8',
    'digits_cnn_dafa-trades_eps0.2_s0_15ee2b8c',
    'digits_cnn_dafa-trades_eps0.2_s1_c8e1e839',
    'digits_cnn_dafa-trades_eps0.2_s2_cabd47fd',
    'digits_cnn_wat_eps0.2_s0_0b66862f',
    'digits_cnn_wat_eps0.2_s1_60db7aed',
    'digits_cnn_wat_eps0.2_s2_9c6027e0',
    'digits_cnn_frl-rw_eps0.2_s0_c4db5284',
    'digits_cnn_frl-rw_eps0.2_s1_2ffefbe7',
    'digits_cnn_frl-rw_eps0.2_s2_11e7301f',
    'digits_cnn_frl-rwrm_eps0.2_s0_3f79c5e3',
    'digits_cnn_frl-rwrm_eps0.2_s1_6239db1e',
    'digits_cnn_frl-rwrm_eps0.2_s2_8c3e8f5b',
]

METHODS_CIFAR10_KEYS = [
    'cifar10_preactresnet18_madry_eps0.03137_s0_1526bb88',
    'cifar10_preactresnet18_madry_eps0.03137_s1_0df173d2',
    'cifar10_preactresnet18_madry_eps0.03137_s2_0c3aea95',
    'cifar10_preactresnet18_fat-madry_eps0.03137_lam0.5_s0_570b1784',
    'cifar10_preactresnet18_fat-madry_eps0.03137_lam0.5_s1_545056cd',
    'cifar10_preactresnet18_fat-madry_eps0.03137_lam0.5_s2_d8398e34',
    'cifar10_preactresnet18_cfa-madry_eps0.03137_s0_307d068a',
    'cifar10_preactresnet18_cfa-madry_eps0.03137_s1_920f8b91',
    'cifar10_preactresnet18_cfa-madry_eps0.03137_s2_a89ae74b',
    'cifar10_preactresnet18_dafa-madry_eps0.03137_s0_e944d22f',
    'cifar10_preactresnet18_dafa-madry_eps0.03137_s1_d163d960',
    'cifar10_preactresnet18_dafa-madry_eps0.03137_s2_b1567690',
    'cifar10_preactresnet18_trades_eps0.03137_s0_12670a11',
    'cifar10_preactresnet18_trades_eps0.03137_s1_9cceeea5',
    'cifar10_preactresnet18_trades_eps0.03137_s2_8e6889a8',
    'cifar10_preactresnet18_fat-trades_eps0.03137_lam0.5_s0_a9bc4ba6',
    'cifar10_preactresnet18_fat-trades_eps0.03137_lam0.5_s1_6d0eb0aa',
    'cifar10_preactresnet18_fat-trades_eps0.03137_lam0.5_s2_f6ff2955',
    'cifar10_preactresnet18_cfa-trades_eps0.03137_s0_89933c6c',
    'cifar10_preactresnet18_cfa-trades_eps0.03137_s1_50296b83',
    'cifar10_preactresnet18_cfa-trades_eps0.03137_s2_38f0a269',
    'cifar10_preactresnet18_dafa-trades_eps0.03137_s0_ceb8327e',
    'cifar10_preactresnet18_dafa-trades_eps0.03137_s1_5d369a86',
    'cifar10_preactresnet18_dafa-trades_eps0.03137_s2_04118162',
    'cifar10_preactresnet18_wat_eps0.03137_s0_2ae6ab87',
    'cifar10_preactresnet18_wat_eps0.03137_s1_240a8494',
    'cifar10_preactresnet18_wat_eps0.03137_s2_b6c8bc04',
    'cifar10_preactresnet18_frl-rw_eps0.03137_s0_ff432056',
    'cifar10_preactresnet18_frl-rw_eps0.03137_s1_fc423e35',
    'cifar10_preactresnet18_frl-rw_eps0.03137_s2_265c2051',
    'cifar10_preactresnet18_frl-rwrm_eps0.03137_s0_16b7d60a',
    'cifar10_preactresnet18_frl-rwrm_eps0.03137_s1_08d3b50d',
    'cifar10_preactresnet18_frl-rwrm_eps0.03137_s2_cf60905a',
]


def _keys(name: str) -> list[str]:
    return [p.key for p in grid.build_sweep(*grid.read_sweep_file(None, name)).points]


def test_demo_keys_unchanged():
    assert _keys("demo") == DEMO_KEYS


def test_methods_grids_keep_their_keys():
    for name, pinned in (("methods", METHODS_KEYS), ("methods_cifar10", METHODS_CIFAR10_KEYS)):
        now = set(_keys(name))
        assert not set(pinned) - now, f"{name}: points renamed or gone: {sorted(set(pinned) - now)}"
