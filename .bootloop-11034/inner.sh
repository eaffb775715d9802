#!/bin/sh
exec bash /work/main/resources/nested/bootloop.sh --inner /work/main/.bootloop-11034
