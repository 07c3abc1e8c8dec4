#!/usr/bin/env bash
# Mutation testing of course_lib with mutmut 3: how many planted bugs the tests catch, module by module.
#
#   bash tools/mutation.sh [--repo DIR] [--out DIR] [--jobs N] [--standin] [MODULE ...]
#
# MODULE: modules of course_lib (default: text rnn vision resnet transfer cam accel anneal; any other module name works,
# e.g. the modules transfer is split into). Each module is mutated alone, against the test files that exercise it: those
# importing it or a module that imports it (excluding MUT_EXCLUDE_TESTS); mutmut then runs, for each mutant, only the
# tests that called the mutated function, fastest first, up to the first failure.
#   --repo DIR   the checkout whose course_lib/ and tests/ are mutated and run (default: this script's checkout); give a
#                `git worktree` to score another commit. Its files are copied: DIR is only read.
#   --out DIR    the report folder (default: DIR/runs/mutation, git-ignored): scores.tsv, and per module summary.txt,
#                survived.diff, no_tests.diff (mutants no selected test reaches), timeout.diff, mutmut.log
#   --jobs N     mutants tested at once (default 1: the machine is shared)
#   --standin    run the tests under the CUDA stand-in (tools/standin of --repo, or MUT_STANDIN_DIR): device mistakes
#                (a tensor or generator left on the host) are equivalent on a CPU and only killed there
# Environment: MUT_TESTS_<module>="tests/test_a.py tests/test_b.py" replaces a module's test selection;
#   MUT_EXCLUDE_TESTS (default "test_all.py test_tools.py": they run the library in fresh interpreters, which mutmut
#   cannot trace to a function); MUT_TIMEOUT_MULT (default 10: a mutant's tests may take 10 x (their clean time + 2 s)
#   wall-clock, then it counts as a timeout); MUT_MEM_GB (default 6: address-space limit of every test process, so a
#   mutant that allocates without bound fails instead of starving the machine); MUT_MODULE_HOURS (default 8: a
#   module's whole run is stopped after this, its finished mutants still scored); MUT_WORK (the work folder, default
#   a new one under ${TMPDIR:-/tmp}, removed at the end unless MUT_KEEP=1); MUT_PYTHON (default .venv/bin/python of
#   this checkout; mutmut>=3.8,<4 is installed into it when missing).
# Not run in CI (hours). Nothing is written inside --repo except the report under runs/ (git-ignored) when --out is
# not given. Decorated functions (mutmut skips them) are rewritten in the work copy as `f = deco(f)` after the def,
# so they are mutated too, and one-line docstrings are triple-quoted there (mutmut leaves those alone); the reported
# lines are those of the module in --repo. mutmut switches mutants on at call time: an object a test file builds at
# import (a model in `@pytest.mark.parametrize`) is built unmutated, so its constructor's mutants can survive falsely.
set -euo pipefail
main() {  # all of it in a function: bash reads a script as it runs, and this one may be edited during a run
here=$(cd "$(dirname "$0")/.." && pwd)
repo=$here out= jobs=1 standin= mods=()
while [ $# -gt 0 ]; do
  case $1 in
    --repo) repo=$(cd "$2" && pwd); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --standin) standin=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "mutation.sh: unknown option '$1' (expected --repo, --out, --jobs, --standin or module names)" >&2; exit 2 ;;
    *) mods+=("$1"); shift ;;
  esac
done
[ ${#mods[@]} -gt 0 ] || mods=(text rnn vision resnet transfer cam accel anneal)
py=${MUT_PYTHON:-$here/.venv/bin/python}
senv=()
if [ -n "$standin" ]; then
  sdir=${MUT_STANDIN_DIR:-$repo/tools/standin}
  [ -f "$sdir/sitecustomize.py" ] || { echo "mutation.sh: --standin: no stand-in in $sdir (set MUT_STANDIN_DIR)" >&2; exit 2; }
  senv=(COURSE_STANDIN=cuda)
fi
for m in "${mods[@]}"; do
  [ -f "$repo/course_lib/$m.py" ] || { echo "mutation.sh: no module course_lib/$m.py in $repo" >&2; exit 2; }
done
out=${out:-$repo/runs/mutation}
mkdir -p "$out"; out=$(cd "$out" && pwd)
if ! "$py" -c 'import mutmut, sys; v = tuple(map(int, mutmut.__version__.split(".")[:2])); sys.exit(not (3, 8) <= v < (4,))' 2>/dev/null; then
  "$py" -m pip install -q 'mutmut>=3.8,<4'
fi

work=${MUT_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/course-mutation.XXXXXX")}
mkdir -p "$work"; work=$(cd "$work" && pwd)
case $work/ in "$repo"/*) echo "mutation.sh: the work folder must be outside the repo ($work)" >&2; exit 2 ;; esac
[ "${MUT_KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
echo "mutating $repo ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'no git'))${standin:+ under the CUDA stand-in}, work folder $work, report $out"

cat > "$work/mut_helper.py" <<'PY'
"Helpers of tools/mutation.sh: prepare a module's work copy, and report its mutmut results."
import ast, json, os, re, shutil, sys
from pathlib import Path

SKIP_DECOS = {'staticmethod', 'classmethod'}

def undecorate(lines, src):
    "Rewrite each decorated top-level function or method of `lines` (text, original line) as its bare def + `f = deco(f)`."
    tree, todo = ast.parse(src), []  # (first decorator line, def line, end line, indent, name, decorators), 1-based
    def visit(body, indent):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.decorator_list:
                decos = [ast.get_source_segment(src, d) for d in node.decorator_list]
                if not (len(decos) == 1 and decos[0] in SKIP_DECOS):
                    todo.append((min(d.lineno for d in node.decorator_list), node.lineno, node.end_lineno, indent,
                                 node.name, decos))
            elif isinstance(node, ast.ClassDef): visit(node.body, indent + ' ' * node.body[0].col_offset)
    visit(tree.body, '')
    for first, defl, end, indent, name, decos in sorted(todo, reverse=True):
        call = name
        for d in reversed(decos): call = f'{d}({call})'
        lines.insert(end, (f'{indent}{name} = {call}', None))
        del lines[first - 1:defl - 1]
    return len(todo)

def triple_quote_docstrings(lines, src):
    "Docstrings in one-line quotes become triple-quoted (same text): mutmut leaves those alone, as documentation."
    n = 0
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) or not node.body: continue
        d = node.body[0]
        if not (isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant) and isinstance(d.value.value, str)): continue
        if d.lineno != d.end_lineno: continue
        text, orig = lines[d.lineno - 1]
        seg = text[d.col_offset:d.end_col_offset]
        q = seg[-1]
        if seg[:1] != q or seg[:3] == q * 3 or q not in '"\'': continue
        new = text[:d.col_offset] + q * 3 + seg[1:-1] + q * 3 + text[d.end_col_offset:]
        try: ok = ast.literal_eval(q * 3 + seg[1:-1] + q * 3) == d.value.value
        except (SyntaxError, ValueError): ok = False
        if ok: lines[d.lineno - 1] = (new, orig); n += 1
    return n

def transform(src):
    "The work copy of a mutated module, and the original line of each of its lines (None: added)."
    lines = [(l, i + 1) for i, l in enumerate(src.split('\n'))]
    nd = undecorate(lines, src)
    nq = triple_quote_docstrings(lines, '\n'.join(l for l, _ in lines))
    new = '\n'.join(l for l, _ in lines)
    ast.parse(new)
    return new, [o for _, o in lines], nd, nq

def imports_of(path):
    "Course modules `path` imports (relative or as course_lib.x)."
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: names |= {mod.split('.')[0]} if mod else {a.name for a in node.names}
            elif mod.startswith('course_lib.'): names.add(mod.split('.')[1])
            elif mod == 'course_lib': names |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split('.')[1] for a in node.names if a.name.startswith('course_lib.')}
    return names

def test_selection(root, mod):
    "Test files importing `mod` or a module that (transitively) imports it, less MUT_EXCLUDE_TESTS."
    lib = {p.stem: imports_of(p) for p in (root/'course_lib').glob('*.py') if not p.stem.startswith('_') and p.stem != 'all'}
    users, grew = {mod}, True
    while grew:
        new = {m for m, deps in lib.items() if deps & users} - users
        users |= new; grew = bool(new)
    excl = set(os.environ.get('MUT_EXCLUDE_TESTS', 'test_all.py test_tools.py').split())
    return sorted(f'tests/{p.name}' for p in (root/'tests').glob('test_*.py')
                  if p.name not in excl and (imports_of(p) & users or p.stem == f'test_{mod}'))

GUARD = '''
# --- added by tools/mutation.sh in its work copy: the tests must run the mutated copy, not an installed course_lib
import os as _mut_os, course_lib as _mut_cl
assert _mut_os.path.realpath(_mut_cl.__file__).startswith(_mut_os.environ['MUT_WORK_ROOT']), _mut_cl.__file__
# mutmut forks each mutant's test run from one process that has only collected the tests: pay torch's lazy imports
# (its optimizers import torch._dynamo on first use, ~6 s) there once, not in every mutant's run
import torch as _mut_torch, torch._dynamo, matplotlib.pyplot, torchvision.models
_mut_torch.optim.SGD([_mut_torch.zeros(1, requires_grad=True)], lr=0.1)
'''

def prepare(repo, dest, mod, timeout_mult):
    repo, dest = Path(repo), Path(dest)
    ign = shutil.ignore_patterns('__pycache__', '*.pyc', '.pytest_cache')
    shutil.copytree(repo/'course_lib', dest/'course_lib', ignore=ign)
    shutil.copytree(repo/'tests', dest/'tests', ignore=ign)
    f = dest/'course_lib'/f'{mod}.py'
    new, origin, nd, nq = transform(f.read_text())
    f.write_text(new)
    (dest/'line_origin.json').write_text(json.dumps(origin))
    with open(dest/'tests'/'conftest.py', 'a') as c: c.write(GUARD)
    env = os.environ.get(f'MUT_TESTS_{mod}')
    tests = env.split() if env else test_selection(dest, mod)
    if not tests: sys.exit(f'mutation.sh: no test file exercises course_lib/{mod}.py')
    nl = '\n    '
    (dest/'setup.cfg').write_text(f'''[mutmut]
source_paths = course_lib
only_mutate = course_lib/{mod}.py
pytest_add_cli_args_test_selection ={nl}{nl.join(tests)}
pytest_add_cli_args ={nl}-p{nl}no:cacheprovider{nl}-W{nl}ignore::DeprecationWarning
timeout_multiplier = {timeout_mult}
timeout_constant = 2.0
process_isolation = forkserver
use_git_change_detection = false
''' + ('debug = true\n' if os.environ.get('MUT_DEBUG') == '1' else ''))
    print(f'{nd} decorated function(s) unwrapped, {nq} docstrings triple-quoted; tests: {" ".join(t[6:] for t in tests)}')

def function_lines(src):
    "Qualified name (Class.method or function) -> line of its `def`."
    out = {}
    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)): out[prefix + node.name] = node.lineno
            elif isinstance(node, ast.ClassDef): visit(node.body, prefix + node.name + '.')
    visit(ast.parse(src).body, '')
    return out

def cell_of(lines, lineno):
    "The notebook cell (`# %% ../nbs/x.ipynb #id` above `lineno`) a line of a generated module comes from."
    for l in reversed(lines[:lineno]):
        if l.startswith('# %% '): return l[5:].replace('../', '')
    return ''

def locate(diff, defl, lines):
    "Line (in `lines`, the mutated copy) of a mutant's first changed line; its diff is of the function's text alone."
    dl = diff.split('\n')
    hunk = next((i for i, l in enumerate(dl) if l.startswith('@@')), None)
    if hunk is None: return defl
    body = dl[hunk + 1:]
    k = next((i for i, l in enumerate(body) if l.startswith('-')), None)
    if k is None: return defl
    rel = int(re.match(r'@@ -(\d+)', dl[hunk]).group(1)) + sum(1 for l in body[:k] if not l.startswith('+'))
    first = defl  # the function's text starts at the comments and blank lines right above its def (libcst's leading lines)
    while first > 1 and (not lines[first - 2].strip() or lines[first - 2].lstrip().startswith('#')): first -= 1
    while first < defl and not lines[first - 1].strip(): first += 1
    line = first + rel - 1
    if 0 < line <= len(lines) and lines[line - 1].strip() == body[k][1:].strip(): return line
    return next((i + 1 for i in range(defl - 1, len(lines)) if lines[i].strip() == body[k][1:].strip()), defl)

def kind(diff):
    "'string' for a mutant that only changes a string literal's text (XX added, case changed), else ''."
    minus = [l[1:] for l in diff.split('\n') if l.startswith('-') and not l.startswith('---')]
    plus = [l[1:] for l in diff.split('\n') if l.startswith('+') and not l.startswith('+++')]
    if len(minus) != 1 or len(plus) != 1: return ''
    a, b = minus[0], plus[0]
    if b.replace('XX', '') == a and 'XX' in b: return 'string'
    if a != b and a.lower() == b.lower(): return 'string'
    return ''

def report(moddir, mod, orig, outdir, seconds):
    os.chdir(moddir)
    sys.path.insert(0, str(Path('mutants').resolve()))
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    path = Path('course_lib')/f'{mod}.py'
    copy = path.read_text(); lines = copy.split('\n'); defs = function_lines(copy)
    origin = json.loads(Path('line_origin.json').read_text())
    orig_lines = Path(orig).read_text().split('\n')
    data = SourceFileMutationData(path=path); data.load()
    outdir = Path(outdir); outdir.mkdir(parents=True, exist_ok=True)
    counts, by_status = {}, {}
    for key, code in sorted(data.exit_code_by_key.items(), key=lambda kv: kv[0]):
        st = status_by_exit_code[code]
        counts[st] = counts.get(st, 0) + 1
        by_status.setdefault(st, []).append(key)
    def qualname(key):
        # keys: course_lib.text.x_fn__mutmut_3 or course_lib.text.xǁClassǁmethod__mutmut_3
        name = key.rsplit('.', 1)[-1].rsplit('__mutmut_', 1)[0]
        return name[2:] if name.startswith('x_') else name[1:].strip('ǁ').replace('ǁ', '.')
    n_string = {}
    def write(fname, keys, st, with_diff=True):
        found = []
        for key in keys:
            qual = qualname(key)
            try: diff = get_diff_for_mutant(key, path=path)
            except Exception as e: diff = f'(no diff: {e!r})'
            line = origin[locate(diff, defs[qual], lines) - 1] if qual in defs else None
            found.append((line or 0, int(key.rsplit('__mutmut_', 1)[-1]), key, qual, diff))
        with open(outdir/fname, 'w') as f:
            for line, _, key, qual, diff in sorted(found, key=lambda x: x[:2]):
                loc = f'course_lib/{mod}.py:{line}' if line else f'course_lib/{mod}.py ({qual})'
                cell = cell_of(orig_lines, line) if line else ''
                kd = kind(diff)
                if kd: n_string[st] = n_string.get(st, 0) + 1
                f.write(f'## {key.rsplit(".", 1)[-1]}  {loc}  {qual}  [{cell}]{"  (string literal)" if kd else ""}\n')
                if with_diff: f.write('\n'.join(l for l in diff.split('\n') if not l.startswith(('---', '+++'))) + '\n\n')
    write('survived.diff', by_status.get('survived', []), 'survived')
    write('no_tests.diff', by_status.get('no tests', []), 'no tests')
    write('timeout.diff', by_status.get('timeout', []), 'timeout')
    other = [k for st, ks in by_status.items() if st not in ('killed', 'survived', 'no tests', 'timeout') for k in ks]
    write('other.diff', other, 'other')
    k, s, t, n = (counts.get(x, 0) for x in ('killed', 'survived', 'timeout', 'no tests'))
    total = sum(counts.values()); o = total - k - s - t - n
    score = 100 * (k + t) / total if total else 0.
    row = f'{mod}\t{k}\t{s}\t{t}\t{n}\t{o}\t{total}\t{score:.1f}\t{seconds}'
    (outdir/'summary.txt').write_text(
        'module\tkilled\tsurvived\ttimeout\tno_tests\tother\ttotal\tscore%\tseconds\n' + row + '\n'
        + '\n'.join(f'{st}: {c}' for st, c in sorted(counts.items())) + '\n'
        + f'of them string-literal mutants (message text): survived {n_string.get("survived", 0)}, '
          f'no tests {n_string.get("no tests", 0)}\n')
    print(row)

if __name__ == '__main__':
    cmd, *args = sys.argv[1:]
    {'prepare': prepare, 'report': report}[cmd](*args)
PY

ulimit -v $(( ${MUT_MEM_GB:-6} * 1024 * 1024 ))
scores=$out/scores.tsv
[ -f "$scores" ] || printf 'module\tkilled\tsurvived\ttimeout\tno_tests\tother\ttotal\tscore%%\tseconds\n' > "$scores"
rows=()
for m in "${mods[@]}"; do
  d=$work/$m; rm -rf "$d"; mkdir -p "$d" "$out/$m"
  mkdir -p "$d/mutants"  # before python starts: a PYTHONPATH entry missing then is cached as absent, and the venv's course_lib wins
  echo "== $m: $("$py" "$work/mut_helper.py" prepare "$repo" "$d" "$m" "${MUT_TIMEOUT_MULT:-10}")"
  t=$SECONDS
  # PYTHONPATH: the tests' own subprocesses import the mutated copy too (the venv's course_lib may be another checkout)
  (cd "$d" && env "${senv[@]}" MUT_WORK_ROOT="$d" PYTHONPATH="$d/mutants${standin:+:$sdir}" CI=true COURSE_OFFLINE=1 \
      COURSE_DATA_MIRROR="${COURSE_DATA_MIRROR:-$(cd "$here/.." && pwd)/shared/data}" COURSE_DATA="$d/data" \
      MPLBACKEND=Agg OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 COURSE_SIZE=quick \
      timeout -k 60 $(( ${MUT_MODULE_HOURS:-8} * 3600 )) "$py" -m mutmut run --max-children "$jobs") \
      > "$out/$m/mutmut.log" 2>&1 || echo "   mutmut stopped with status $? (see $out/$m/mutmut.log); scoring what it finished"
  row=$("$py" "$work/mut_helper.py" report "$d" "$m" "$repo/course_lib/$m.py" "$out/$m" $((SECONDS - t)))
  echo "$row" >> "$scores"; rows+=("$row")
  echo "   $row  (report: $out/$m)"
  [ "${MUT_KEEP:-0}" = 1 ] || rm -rf "$d"
done
echo
printf 'module\tkilled\tsurvived\ttimeout\tno_tests\tother\ttotal\tscore%%\tseconds\n'
printf '%s\n' "${rows[@]}"
echo "score = (killed + timeout) / total; 'no_tests': mutants no selected test reaches. Survivors' diffs: $out/<module>/"
}
main "$@"; exit
