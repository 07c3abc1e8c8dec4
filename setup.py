"Install course_lib from settings.ini (nbdev 2 layout, without the template's pkg_resources import)."
from configparser import ConfigParser
import setuptools, shlex

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
for k in 'version description lib_name min_python author author_email requirements dev_requirements'.split():
    assert cfg.get(k), f'settings.ini is missing `{k}`'

reqs, dev_reqs = shlex.split(cfg['requirements']), shlex.split(cfg['dev_requirements'])

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'], keywords=cfg['keywords'].split(),
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'], license='Apache-2.0', url=cfg['git_url'],
    classifiers=['Programming Language :: Python :: 3', 'License :: OSI Approved :: Apache Software License'],
    scripts=[],
    packages=setuptools.find_packages(include=['course_lib', 'course_lib.*']),
    python_requires='>=' + cfg['min_python'], install_requires=reqs, extras_require={'dev': dev_reqs},
    entry_points={'nbdev': [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]},
    include_package_data=True, zip_safe=False)
